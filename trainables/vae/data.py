"""The datasets of the VampPrior study: a registry of dataset classes and their loaders.

Each dataset is one class decorated with `@register_dataset(name)`: it names its official files
(URLs and pinned checksums), parses them exactly as the paper's reference code (REF,
jmtomczak/vae_vampprior `utils/load_data.py`) does, and knows its splits and pseudo-input init.
How the model treats it (likelihood, image shape, binarisation) is its entry in
`trainables.vae.catalog.DATASETS`, which the report and the CLI read without loading anything.
Adding a dataset is one catalog line, one class and a test. The files themselves (checksums,
data root, download, cache) are `trainables/vae/download.py`'s.

Public API:
    load_dataset(name, root=None, *, download=True) -> Splits
    fetch(name, root=None, *, base_url=None, progress=None) -> list[Path]
    dataset_state(name, root=None) -> "ok" | "missing" | "corrupt"
    file_states(name, root=None) -> list[FileState]
    verify(root=None) -> dict[str, DatasetReport]
    DATASETS, register_dataset, get_spec, DatasetSpec, DatasetInfo, Splits
    (and from download.py: resolve_root, download_file, file_digest, bytes_digest, DataFile)

Data root layout (REF's and torchvision's): `MNIST_static/`, `MNIST/raw/`, `FashionMNIST/raw/`,
`Caltech101Silhouettes/`, `Freyfaces/`, `OMNIGLOT/`. A file may be stored gzipped as `NAME.gz`;
its official checksum is then checked on the decompressed bytes.

Nothing here ever unpickles: .amat is text, idx is raw bytes, .mat is read by `scipy.io.loadmat`.
"""

from __future__ import annotations

import difflib
import gzip
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from trainables.vae import catalog
from trainables.vae.download import (  # noqa: F401 (re-exported: the data API in one import)
    CHECKSUM_KINDS,
    CorruptFile,
    DataFile,
    FileState,
    bytes_digest,
    data_root_hint,
    download_file,
    file_digest,
    file_state,
    locate,
    official_bytes,
    resolve_root,
    urls_of,
)
from trainables.vae.errors import DataError

LIKELIHOODS = ("bernoulli", "logistic256")
BINARIZATIONS = ("static", "dynamic", None)

# REF calls np.random.seed(777) right before binarizing val, then test, once. Using the same
# legacy generator (its stream is frozen by numpy's compatibility policy) in the same order gives
# the same binary val/test images as REF on every machine.
BINARIZE_SEED = 777
# REF shuffles Frey Faces and OMNIGLOT train with numpy's global state before splitting; we use a
# fixed seed on the same frozen legacy generator so the split is identical everywhere.
SPLIT_SEED = 0


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset."""

    name: str
    likelihood: str                           # "bernoulli" or "logistic256"
    image_shape: tuple[int, int, int]         # (C, H, W)
    input_dim: int                            # C * H * W
    binarization: str | None                  # "static", "dynamic" (train re-binarized every epoch) or None
    pseudo_init: tuple[float, float]          # N(mean, std) init of the VampPrior pseudo-inputs
    split_sizes: tuple[int, int, int]         # train / val / test


@dataclass(frozen=True, eq=False)
class Splits:
    """train, val, test: float32 tensors [N, D] with values in [0, 1]; info: how to model them."""

    train: Tensor
    val: Tensor
    test: Tensor
    info: DatasetInfo


class DatasetSpec:
    """One dataset: its files, parser, split and transform, and how to model it.

    Subclasses set the class attributes and implement `parse` (official bytes -> arrays as stored)
    and `split` (arrays -> train, val, test with values in [0, 1]), then register with
    `@register_dataset(name)`.
    """

    name: ClassVar[str] = ""
    files: ClassVar[Mapping[str, DataFile]]   # role -> file; `parse` gets the bytes by role
    likelihood: ClassVar[str]
    image_shape: ClassVar[tuple[int, int, int]]
    binarization: ClassVar[str | None]
    pseudo_init: ClassVar[tuple[float, float]]
    split_sizes: ClassVar[tuple[int, int, int]]

    def parse(self, blobs: Mapping[str, bytes]) -> dict[str, np.ndarray]:
        """Official file bytes by role -> arrays as stored in the files."""
        raise NotImplementedError

    def split(self, raw: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays as stored -> train, val, test [N, D], transformed to [0, 1]."""
        raise NotImplementedError

    @property
    def input_dim(self) -> int:
        return math.prod(self.image_shape)

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.name, likelihood=self.likelihood, image_shape=self.image_shape,
                           input_dim=self.input_dim, binarization=self.binarization,
                           pseudo_init=self.pseudo_init, split_sizes=self.split_sizes)

    def build(self, blobs: Mapping[str, bytes]) -> tuple[Tensor, Tensor, Tensor]:
        """Parse, split and transform official bytes into float32 tensors [N, D] in [0, 1]."""
        out = []
        for part, x in zip(("train", "val", "test"), self.split(self.parse(blobs))):
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != self.input_dim:
                raise DataError(f"{self.name}: {part} has shape {x.shape}, expected [N, {self.input_dim}]")
            if x.size and (x.min() < 0.0 or x.max() > 1.0):
                raise DataError(f"{self.name}: {part} has values outside [0, 1] "
                                f"(min {x.min()}, max {x.max()})")
            out.append(torch.from_numpy(x))
        return out[0], out[1], out[2]


DATASETS: dict[str, DatasetSpec] = {}
_S = TypeVar("_S", bound=type[DatasetSpec])


def register_dataset(name: str) -> Callable[[_S], _S]:
    """Class decorator: check the spec's metadata and add one instance to `DATASETS` under `name`."""

    def deco(cls: _S) -> _S:
        # Programmer errors in a spec fail at import, not in the middle of a sweep.
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        facts = catalog.DATASETS.get(name)
        if facts is None:
            raise ValueError(f"dataset {name!r} has no entry in trainables.vae.catalog.DATASETS; add its "
                             "likelihood, image shape and binarization there")
        cls.likelihood, cls.image_shape, cls.binarization = facts.likelihood, facts.image_shape, facts.binarization
        if cls.likelihood not in LIKELIHOODS:
            raise ValueError(f"{name}: likelihood {cls.likelihood!r} not in {LIKELIHOODS}")
        if cls.binarization not in BINARIZATIONS:
            raise ValueError(f"{name}: binarization {cls.binarization!r} not in {BINARIZATIONS}")
        if len(cls.image_shape) != 3 or len(cls.split_sizes) != 3 or len(cls.pseudo_init) != 2:
            raise ValueError(f"{name}: image_shape and split_sizes need 3 values, pseudo_init 2")
        for f in cls.files.values():
            if not f.checksums or set(f.checksums) - set(CHECKSUM_KINDS):
                raise ValueError(f"{name}: {f.path} needs checksums of kinds {CHECKSUM_KINDS}")
        cls.name = name
        DATASETS[name] = cls()
        return cls

    return deco


def dataset_digest(spec: DatasetSpec) -> str:
    """A dataset's identity from its pinned checksums: the sha256 of its official file (first 32
    hex digits); for several files, the sha256 of their checksums in path order."""
    def pinned(f: DataFile) -> str:
        return f.checksums.get("sha256") or next(iter(f.checksums.values()))

    files = sorted(spec.files.values(), key=lambda f: f.path)
    if len(files) == 1:
        return pinned(files[0])[:32]
    return bytes_digest(",".join(pinned(f) for f in files).encode(), "sha256")[:32]


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset `name`; an unknown name raises `DataError` with the choices."""
    try:
        return DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown dataset {name!r}; {hint}choose one of {sorted(DATASETS)}") from None


# --------------------------------------------------------------------------------------------------
# Parsers shared by several datasets
# --------------------------------------------------------------------------------------------------
def _gunzip(blob: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where}: not a readable gzip file ({exc})") from None


def parse_idx(blob: bytes, where: str, ndim: int) -> np.ndarray:
    """A gzipped idx file of unsigned bytes (magic 0x0800 + ndim, big-endian dims) -> uint8 array."""
    raw = _gunzip(blob, where)
    magic = 0x0800 + ndim  # 0x08: unsigned byte; 2051 for images [N, H, W], 2049 for labels [N]
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if len(raw) < header or found != magic:
        raise DataError(f"{where}: not an idx file with {ndim} dimension(s) (magic {found}, expected {magic})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    pixels = np.frombuffer(raw, np.uint8, offset=header)
    if pixels.size != math.prod(dims):
        raise DataError(f"{where}: idx header says {dims} ({math.prod(dims)} bytes), "
                        f"the file has {pixels.size}")
    return pixels.reshape(dims)


_AMAT_ROW = 2 * 784  # 784 digits, each followed by ' ', the last by '\n'


def parse_amat(blob: bytes, where: str) -> np.ndarray:
    """Larochelle's binarized MNIST .amat text (784 '0'/'1' per line) -> uint8 [N, 784], vectorised."""
    buf = np.frombuffer(blob, np.uint8)
    if buf.size == 0 or buf.size % _AMAT_ROW:
        raise DataError(f"{where}: {buf.size} bytes is not a whole number of {_AMAT_ROW}-byte lines "
                        "(784 '0'/'1' separated by single spaces, then '\\n')")
    rows = buf.reshape(-1, _AMAT_ROW)
    seps = rows[:, 1::2]
    if not ((seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all()):
        bad = int(np.argmax(~((seps[:, :-1] == ord(" ")).all(1) & (seps[:, -1] == ord("\n")))))
        raise DataError(f"{where}: line {bad + 1} is not 784 values separated by single spaces")
    values = rows[:, ::2] - np.uint8(ord("0"))  # bytes below '0' wrap around and fail the next check
    if values.max() > 1:
        bad = int(np.argmax((values > 1).any(1)))
        raise DataError(f"{where}: line {bad + 1} has a value other than '0' or '1'")
    return values


def _loadmat(blob: bytes, where: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    from scipy.io import loadmat  # scipy.io is only needed for the .mat datasets

    try:
        # variable_names: read only what we use (Caltech also holds a cell array of class names).
        mat = loadmat(io.BytesIO(blob), variable_names=list(keys))
    except Exception as exc:  # scipy raises many types on malformed files; all mean "unreadable"
        raise DataError(f"{where}: cannot read the MATLAB file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DataError(f"{where}: MATLAB file lacks the variable(s) {missing}")
    return {k: mat[k] for k in keys}


def reshape_fortran(x: np.ndarray) -> np.ndarray:
    """REF's `reshape_data`: rows hold MATLAB (column-major) 28x28 images; transpose each one.

    `x.reshape(-1, 28, 28).reshape(-1, 784, order='F')` keeps the row and maps pixel (i, j) to
    i + 28 j, so a row-major [28, 28] view of the result shows the image upright.
    """
    return x.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")


def _binarize_once(*xs: np.ndarray) -> list[np.ndarray]:
    # One generator for all parts, in REF's order (val, then test): identical to REF's images.
    rng = np.random.RandomState(BINARIZE_SEED)
    return [rng.binomial(1, x).astype(np.float32) for x in xs]


def _check_shape(x: np.ndarray, shape: tuple[int | None, ...], where: str) -> None:
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise DataError(f"{where}: shape {x.shape}, expected {want}")


# --------------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------------
_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


def _amat(split: str, size: int, sha256: str) -> DataFile:
    # sha256 and size: pinned by TensorFlow Datasets (url_checksums/binarized_mnist.txt).
    name = f"binarized_mnist_{split}.amat"
    return DataFile(f"MNIST_static/{name}", (_LAROCHELLE + name,), {"sha256": sha256}, size)


@register_dataset("static_mnist")
class StaticMNIST(DatasetSpec):
    """Larochelle's fixed binarization of MNIST, 50000 / 10000 / 10000, as in REF."""

    files = {
        "train": _amat("train", 78_400_000, "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
        "val": _amat("valid", 15_680_000, "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
        "test": _amat("test", 15_680_000, "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
    }
    pseudo_init = (0.05, 0.01)
    split_sizes = (50_000, 10_000, 10_000)

    def parse(self, blobs):
        return {role: parse_amat(blobs[role], self.files[role].path) for role in ("train", "val", "test")}

    def split(self, raw):
        # REF also shuffles train once; the trainer shuffles every epoch, so file order is kept.
        return raw["train"], raw["val"], raw["test"]


_IDX_NAMES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
              "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


def _idx_files(folder: str, bases: Sequence[str],
               pins: Mapping[str, tuple[int, str, str]]) -> dict[str, DataFile]:
    """The four idx files of an MNIST-format dataset; pins: file name -> (size, md5, sha256)."""
    files = {}
    for role, name in _IDX_NAMES.items():
        size, md5, sha256 = pins[name]
        files[role] = DataFile(f"{folder}/{name}", tuple(base + name for base in bases),
                               {"md5": md5, "sha256": sha256}, size)
    return files


class _IdxDataset(DatasetSpec):
    """MNIST-format gray images: train = first 50000, val = last 10000 of train, test = t10k.

    Pixels are /255. val and test are binarized once (REF, seed 777); train stays gray and the
    trainer draws fresh binary images from it every epoch ("dynamic" binarization: each image
    a new Bernoulli draw each time it is seen, as REF's per-batch `torch.bernoulli`; the draw
    comes from the run's own generator, trainables/vae/train.py `EpochDraws`).
    """

    pseudo_init = (0.05, 0.01)
    split_sizes = (50_000, 10_000, 10_000)

    def parse(self, blobs):
        raw = {role: parse_idx(blobs[role], self.files[role].path, 3 if role.endswith("images") else 1)
               for role in self.files}
        for part in ("train", "test"):
            images, labels = raw[f"{part}_images"], raw[f"{part}_labels"]
            _check_shape(images, (None, 28, 28), self.files[f"{part}_images"].path)
            if labels.shape[0] != images.shape[0]:
                raise DataError(f"{self.name}: {images.shape[0]} {part} images but {labels.shape[0]} labels")
        return raw

    def split(self, raw):
        # float32 / 255 as REF (torch .float() / 255.), so the binarized images match REF's bit for bit.
        train = raw["train_images"].reshape(-1, 784).astype(np.float32) / 255.0
        test = raw["test_images"].reshape(-1, 784).astype(np.float32) / 255.0
        if train.shape[0] != 60_000:
            raise DataError(f"{self.name}: {train.shape[0]} training images, expected 60000")
        val, test = _binarize_once(train[50_000:], test)
        return train[:50_000], val, test


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "https://storage.googleapis.com/cvdf-datasets/mnist/",
                  "http://yann.lecun.com/exdb/mnist/")


@register_dataset("dynamic_mnist")
class DynamicMNIST(_IdxDataset):
    # md5: torchvision MNIST.resources; sha256 and size: TensorFlow Datasets url_checksums/mnist.txt.
    files = _idx_files("MNIST/raw", _MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": (9_912_422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": (28_881, "d53e105ee54ea40749a09fcbcd1e9432",
                                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": (1_648_877, "9fb629c4189551a2d022fa330f9573f3",
                                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": (4_542, "ec29112dd5afa0611ce80d1b7f02629c",
                                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    })


_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")


@register_dataset("fashion_mnist")
class FashionMNIST(_IdxDataset):
    """Fashion-MNIST, binarized like dynamic MNIST (as the published VampPrior numbers on it)."""

    # md5: torchvision FashionMNIST.resources; sha256 and size: TensorFlow Datasets
    # url_checksums/fashion_mnist.txt.
    files = _idx_files("FashionMNIST/raw", _FASHION_MIRRORS, {
        "train-images-idx3-ubyte.gz": (26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29_515, "25c81989df183df01b3e8a0aad5dffbe",
                                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4_422_102, "bef4ecab320f06d8554ea6380940ec79",
                                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5_148, "bb300cfdad3c16e7a12a480ee83cd310",
                                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    })


@register_dataset("caltech101")
class Caltech101Silhouettes(DatasetSpec):
    """Caltech 101 Silhouettes 28x28, Marlin's split 1: 4100 / 2264 / 2307, fixed binary images."""

    # md5: pinned for this URL by DeepMind's dm_nevis; sha256 computed on the verified copy.
    files = {"mat": DataFile(
        "Caltech101Silhouettes/caltech101_silhouettes_28_split1.mat",
        ("https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",),
        {"md5": "4483e9c14b188fd09937f9ea6f9ea777",
         "sha256": "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"},
        872_124)}
    pseudo_init = (0.5, 0.02)   # REFERENCE.md: Caltech and Frey 0.5 / 0.02
    split_sizes = (4_100, 2_264, 2_307)
    _keys = ("train_data", "val_data", "test_data")

    def parse(self, blobs):
        raw = _loadmat(blobs["mat"], self.files["mat"].path, self._keys)
        for key in self._keys:
            _check_shape(raw[key], (None, 784), f"{self.files['mat'].path}:{key}")
            if raw[key].max(initial=0) > 1:
                raise DataError(f"{self.files['mat'].path}:{key} is not binary")
        return raw

    def split(self, raw):
        # REF: x = 1 - reshape_data(...). The .mat stores MATLAB column-major images (the Fortran
        # reshape turns them upright) with the silhouette as 0 on a background of 1; 1 - x makes
        # the object the "on" pixels, as in MNIST. REF also shuffles train and val once; the
        # trainer shuffles every epoch, so file order is kept.
        return tuple(1.0 - reshape_fortran(raw[key].astype(np.float32)) for key in self._keys)


@register_dataset("frey_faces")
class FreyFaces(DatasetSpec):
    """Roweis' Frey Faces, 1965 gray 28x20 images, shuffled with SPLIT_SEED into 1565 / 200 / 200."""

    # md5: pinned for this URL by a public loader; sha256 computed on the verified copy.
    files = {"mat": DataFile(
        "Freyfaces/frey_rawface.mat",
        ("https://cs.nyu.edu/~roweis/data/frey_rawface.mat",),
        {"md5": "5aeb024d42b8a6091f30e5eb18c8a48d",
         "sha256": "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"},
        1_100_584)}
    pseudo_init = (0.5, 0.02)   # REFERENCE.md: Caltech and Frey 0.5 / 0.02
    split_sizes = (1_565, 200, 200)

    def parse(self, blobs):
        raw = _loadmat(blobs["mat"], self.files["mat"].path, ["ff"])
        _check_shape(raw["ff"], (560, None), f"{self.files['mat'].path}:ff")
        if raw["ff"].dtype != np.uint8:
            raise DataError(f"{self.files['mat'].path}:ff is {raw['ff'].dtype}, expected uint8")
        return raw

    def split(self, raw):
        # ff is [560, 1965]: one column per image, a row-major 28x20 face; REF's pickle is ff.T.
        faces = raw["ff"].T
        # (v + 0.5) / 256: the centre of bin v of the 256-bin discretized logistic likelihood.
        x = (faces.astype(np.float32) + 0.5) / 256.0
        x = x[np.random.RandomState(SPLIT_SEED).permutation(len(x))]
        n_train, n_val, n_test = self.split_sizes
        return x[:n_train], x[n_train:n_train + n_val], x[n_train + n_val:n_train + n_val + n_test]


@register_dataset("omniglot")
class Omniglot(DatasetSpec):
    """Burda's OMNIGLOT (IWAE chardata.mat): 23000 / 1345 / 8070 gray images, binarized like MNIST."""

    # The only pinned checksum found: the file's git blob id in yburda/iwae.
    files = {"mat": DataFile(
        "OMNIGLOT/chardata.mat",
        ("https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat",
         "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat"),
        {"git-blob-sha1": "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"})}
    pseudo_init = (0.05, 0.01)
    split_sizes = (23_000, 1_345, 8_070)
    n_val = 1_345  # REF: load_omniglot(n_validation=1345)

    def parse(self, blobs):
        raw = _loadmat(blobs["mat"], self.files["mat"].path, ["data", "testdata"])
        for key in ("data", "testdata"):
            _check_shape(raw[key], (784, None), f"{self.files['mat'].path}:{key}")
        return raw

    def split(self, raw):
        # As REF: images are columns of MATLAB column-major 28x28 images.
        train = reshape_fortran(raw["data"].T.astype(np.float32))
        test = reshape_fortran(raw["testdata"].T.astype(np.float32))
        train = train[np.random.RandomState(SPLIT_SEED).permutation(len(train))]
        train, val = train[:-self.n_val], train[-self.n_val:]
        val, test = _binarize_once(val, test)
        return train, val, test


# --------------------------------------------------------------------------------------------------
# Data root and file state
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetReport:
    """A dataset's metadata and the state of its files in one data root."""

    info: DatasetInfo
    state: str
    files: tuple[FileState, ...]


def _corrupt_message(name: str, path: Path, detail: str) -> str:
    return (f"{name}: {path} is corrupt ({detail}). Delete it and run `sweeper data fetch {name}` "
            "(or put a good copy there by hand).")


def file_states(name: str, root: str | Path | None = None) -> list[FileState]:
    """State of each file of dataset `name` in the data root (reads and checksums present files)."""
    spec, root = get_spec(name), resolve_root(root)
    return [file_state(f, root) for f in spec.files.values()]


def _overall(states: Iterable[FileState]) -> str:
    kinds = {s.state for s in states}
    return "corrupt" if "corrupt" in kinds else "missing" if "missing" in kinds else "ok"


def dataset_state(name: str, root: str | Path | None = None) -> str:
    """"ok" (all files present and valid), "missing" (some absent) or "corrupt" (some invalid)."""
    return _overall(file_states(name, root))


def verify(root: str | Path | None = None) -> dict[str, DatasetReport]:
    """Check every registered dataset in the data root: name -> report (info, state, file states)."""
    reports = {}
    for name, spec in DATASETS.items():
        states = tuple(file_states(name, root))
        reports[name] = DatasetReport(spec.info, _overall(states), states)
    return reports


def fetch(name: str, root: str | Path | None = None, *, base_url: str | None = None,
          progress: bool | None = None) -> list[Path]:
    """Make sure every file of dataset `name` is present and valid in the data root; return paths.

    Missing files are downloaded (from `base_url`, else env SWEEPER_DATA_MIRROR, else the
    official URLs); a corrupt file raises `DataError` saying to delete it (never overwritten). A
    failed download raises `DataError` and leaves no trace of that file (no part, no lock, no
    folder it created); the files of the dataset already downloaded and verified stay, so a
    retry fetches only the rest.
    """
    spec, root = get_spec(name), resolve_root(root)
    paths = []
    for f in spec.files.values():
        state = file_state(f, root)
        if state.state == "corrupt":
            raise DataError(_corrupt_message(name, state.path, state.detail))
        if state.state == "missing":
            download_file(urls_of(f, base_url), root / f.path, f.checksums, size=f.size, progress=progress,
                          root=root)
        paths.append(state.path)
    return paths


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def load_dataset(name: str, root: str | Path | None = None, *, download: bool = True) -> Splits:
    """Load dataset `name` from the data root as float32 tensors [N, D] in [0, 1], split as REF.

    Missing files are downloaded when `download` (see `fetch`); every file's official checksum is
    verified on each load. A read-only root with all files present works: no lock is taken then.
    """
    spec, root = get_spec(name), resolve_root(root)
    blobs = {}
    for role, f in spec.files.items():
        found = locate(f, root)
        if found is None:
            if not download:
                raise DataError(f"{name}: {root / f.path} is missing (it may also be gzipped as "
                                f"{Path(f.path).name}.gz). Run `sweeper data fetch {name}` or put the "
                                f"official file there by hand. {data_root_hint(root)}")
            download_file(urls_of(f, None), root / f.path, f.checksums, size=f.size, root=root)
            found = (root / f.path, False)
        try:
            blobs[role] = official_bytes(f, *found)
        except CorruptFile as exc:
            raise DataError(_corrupt_message(name, found[0], str(exc))) from None
    train, val, test = spec.build(blobs)
    sizes = (len(train), len(val), len(test))
    if sizes != spec.split_sizes:
        raise DataError(f"{name}: splits have {sizes} images, expected {spec.split_sizes}")
    return Splits(train, val, test, spec.info)
