"""Datasets: registry, loaders on the real files, checksums, and the download path over real HTTP."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import filelock
import numpy as np
import pytest
import scipy.io
import torch

from trainables.vae.errors import DataError
from trainables.vae import data as D
from trainables.vae.data import (
    DATASETS, DataFile, DatasetSpec, bytes_digest, dataset_state, download_file, fetch, file_digest,
    file_states, load_dataset, parse_amat, register_dataset, resolve_root,
)

CALTECH = "Caltech101Silhouettes/caltech101_silhouettes_28_split1.mat"
FREY = "Freyfaces/frey_rawface.mat"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


# --- registry -------------------------------------------------------------------------------------
def test_registry_holds_the_six_datasets_with_their_metadata():
    assert set(DATASETS) == {"static_mnist", "dynamic_mnist", "fashion_mnist", "caltech101",
                             "frey_faces", "omniglot"}
    info = {name: spec.info for name, spec in DATASETS.items()}
    assert info["frey_faces"].likelihood == "logistic256"
    assert info["frey_faces"].image_shape == (1, 28, 20) and info["frey_faces"].input_dim == 560
    assert info["frey_faces"].binarization is None
    assert {n for n, i in info.items() if i.likelihood == "bernoulli"} == set(DATASETS) - {"frey_faces"}
    assert {n for n, i in info.items() if i.binarization == "dynamic"} == {"dynamic_mnist", "fashion_mnist", "omniglot"}
    assert {n for n, i in info.items() if i.binarization == "static"} == {"static_mnist", "caltech101"}
    for name in ("static_mnist", "dynamic_mnist", "fashion_mnist", "omniglot"):
        assert info[name].pseudo_init == (0.05, 0.01)
    for name in ("caltech101", "frey_faces"):
        assert info[name].pseudo_init == (0.5, 0.02)
    assert info["omniglot"].split_sizes == (23000, 1345, 8070)
    # Every file has an official URL and a pinned checksum.
    for spec in DATASETS.values():
        for f in spec.files.values():
            assert f.urls and f.checksums


def test_new_dataset_is_a_catalog_line_and_one_decorated_class(monkeypatch):
    from types import MappingProxyType

    from trainables.vae import catalog
    from trainables.vae.catalog import DATASETS as FACTS, DatasetFacts

    class Tiny(DatasetSpec):
        files = {"x": DataFile("Tiny/x.bin", ("http://example.invalid/x.bin",), {"sha256": "0" * 64})}
        pseudo_init = (0.5, 0.1)
        split_sizes = (1, 1, 1)

        def parse(self, blobs):
            return {"x": np.frombuffer(blobs["x"], np.uint8).reshape(3, 4)}

        def split(self, raw):
            return raw["x"][:1], raw["x"][1:2], raw["x"][2:]

    with pytest.raises(ValueError, match="no entry in trainables.vae.catalog.DATASETS"):
        register_dataset("tiny_for_test")(Tiny)
    # The catalog is read-only: the test swaps in one with two more lines.
    monkeypatch.setattr(catalog, "DATASETS", MappingProxyType({
        **FACTS, "tiny_for_test": DatasetFacts("tiny_for_test", "bernoulli", (1, 2, 2), "static"),
        "tiny_bad": DatasetFacts("tiny_bad", "gaussian", (1, 2, 2), "static")}))
    try:
        register_dataset("tiny_for_test")(Tiny)
        info = DATASETS["tiny_for_test"].info
        assert info.likelihood == "bernoulli" and info.input_dim == 4        # the catalog's facts
        train, val, test = DATASETS["tiny_for_test"].build({"x": bytes([0, 1] * 6)})
        assert train.dtype == torch.float32 and train.shape == (1, 4)
        with pytest.raises(ValueError, match="registered twice"):
            register_dataset("tiny_for_test")(Tiny)
        with pytest.raises(ValueError, match="likelihood"):
            register_dataset("tiny_bad")(type("Bad", (Tiny,), {}))
    finally:
        DATASETS.pop("tiny_for_test", None)
        DATASETS.pop("tiny_bad", None)


def test_every_registered_dataset_and_prior_is_in_the_catalog():
    from trainables.vae import catalog
    from trainables.vae.priors import PRIORS, MixturePrior

    assert set(DATASETS) == set(catalog.DATASETS) and list(catalog.DATASETS) == list(catalog.DATASET_ORDER)
    assert set(PRIORS) == set(catalog.PRIOR_ORDER)
    assert catalog.K_PRIORS == {n for n, cls in PRIORS.items() if issubclass(cls, MixturePrior)}


def test_unknown_dataset_names_the_choices_and_a_close_match():
    with pytest.raises(DataError, match=r"did you mean 'static_mnist'.*frey_faces"):
        load_dataset("static_mnst")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root() == tmp_path / "env"
    monkeypatch.delenv("SWEEPER_DATA_DIR")
    assert resolve_root().parts[-2:] == ("sweeper", "datasets")


# --- loaders on the real files --------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_mnist(shared_datasets):
    return load_dataset("static_mnist", shared_datasets, download=False)


def test_static_mnist_splits_and_values(static_mnist, shared_datasets):
    s = static_mnist
    assert (s.train.shape, s.val.shape, s.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert s.train.dtype == s.val.dtype == s.test.dtype == torch.float32
    assert all(_is_binary(x) for x in (s.train, s.val, s.test))
    assert s.info.binarization == "static" and s.info.split_sizes == (50000, 10000, 10000)
    # The vectorised parser agrees with REF's per-line parse on the first and last lines.
    with gzip.open(shared_datasets / "MNIST_static/binarized_mnist_test.amat.gz", "rt") as fh:
        lines = fh.readlines()
    ref = np.array([[int(i) for i in line.split()] for line in lines[:20] + lines[-1:]], dtype=np.float32)
    assert torch.equal(torch.cat([s.test[:20], s.test[-1:]]), torch.from_numpy(ref))


def test_amat_parser_rejects_malformed_text():
    good = (" ".join("01"[i % 2] for i in range(784)) + "\n").encode()
    assert parse_amat(good * 3, "x").shape == (3, 784)
    with pytest.raises(DataError, match="whole number"):
        parse_amat(good[:-1], "x")
    with pytest.raises(DataError, match="line 2 .*single spaces"):
        parse_amat(good + good.replace(b" ", b"\t", 1) + good, "x")
    with pytest.raises(DataError, match="line 1 .*other than"):
        parse_amat(b"2" + good[1:], "x")


@pytest.fixture(scope="module")
def dynamic_mnist(shared_datasets):
    return load_dataset("dynamic_mnist", shared_datasets, download=False)


def _idx_gray(path: Path, n: int) -> np.ndarray:
    # Independent of the loader: idx3 = 16-byte header, then the pixels.
    raw = gzip.decompress(path.read_bytes())
    return np.frombuffer(raw[16:], np.uint8).reshape(n, 784).astype(np.float32) / 255.0


def test_dynamic_mnist_matches_ref_and_is_reproducible(dynamic_mnist, shared_datasets):
    s = dynamic_mnist
    assert (s.train.shape, s.val.shape, s.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert s.info.binarization == "dynamic"
    assert _is_binary(s.val) and _is_binary(s.test)
    assert not _is_binary(s.train)  # gray: the trainer draws binary images from it every epoch
    gray_train = _idx_gray(shared_datasets / "MNIST/raw/train-images-idx3-ubyte.gz", 60000)
    gray_test = _idx_gray(shared_datasets / "MNIST/raw/t10k-images-idx3-ubyte.gz", 10000)
    assert torch.equal(s.train, torch.from_numpy(gray_train[:50000]))
    # REF: np.random.seed(777); x_val = binomial(1, x_val); x_test = binomial(1, x_test).
    state = np.random.get_state()
    try:
        np.random.seed(777)
        ref_val = np.random.binomial(1, gray_train[50000:]).astype(np.float32)
        ref_test = np.random.binomial(1, gray_test).astype(np.float32)
    finally:
        np.random.set_state(state)
    assert torch.equal(s.val, torch.from_numpy(ref_val))
    assert torch.equal(s.test, torch.from_numpy(ref_test))
    again = load_dataset("dynamic_mnist", shared_datasets, download=False)
    assert torch.equal(again.val, s.val) and torch.equal(again.test, s.test)


def test_caltech101_splits_flip_and_fortran_order(shared_datasets):
    s = load_dataset("caltech101", shared_datasets, download=False)
    assert (s.train.shape, s.val.shape, s.test.shape) == ((4100, 784), (2264, 784), (2307, 784))
    assert all(_is_binary(x) for x in (s.train, s.val, s.test))
    raw = scipy.io.loadmat(shared_datasets / CALTECH)
    for x, key in ((s.train, "train_data"), (s.val, "val_data"), (s.test, "test_data")):
        # REF's Fortran reshape == transposing each 28x28 image; then 1 - x.
        want = 1.0 - raw[key].reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784).astype(np.float32)
        assert torch.equal(x, torch.from_numpy(want))


def test_frey_faces_values_split_and_seed(shared_datasets):
    s = load_dataset("frey_faces", shared_datasets, download=False)
    assert (s.train.shape, s.val.shape, s.test.shape) == ((1565, 560), (200, 560), (200, 560))
    assert s.info.likelihood == "logistic256" and s.info.image_shape == (1, 28, 20)
    every = torch.cat([s.train, s.val, s.test])
    v = every * 256 - 0.5  # exact in float32: (v + 0.5) / 256 = (2v + 1) / 512
    assert torch.equal(v, v.round()) and v.min() >= 0 and v.max() <= 255
    ff = scipy.io.loadmat(shared_datasets / FREY)["ff"].T  # [1965, 560] uint8
    assert sorted(map(bytes, v.numpy().astype(np.uint8))) == sorted(map(bytes, ff))
    # The split is the documented seeded shuffle, and it is the same on every load.
    perm = np.random.RandomState(D.SPLIT_SEED).permutation(1965)
    assert torch.equal(every, torch.from_numpy((ff[perm].astype(np.float32) + 0.5) / 256))
    again = load_dataset("frey_faces", shared_datasets, download=False)
    assert torch.equal(again.val, s.val) and torch.equal(again.test, s.test)


def test_omniglot_parser_on_a_synthetic_chardata_mat(tmp_path):
    rng = np.random.default_rng(0)
    data, testdata = rng.random((784, 1400)), rng.random((784, 30))  # chardata: one image per column
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"data": data, "testdata": testdata})
    spec = DATASETS["omniglot"]
    train, val, test = spec.build({"mat": buf.getvalue()})
    assert (train.shape, val.shape, test.shape) == ((1400 - 1345, 784), (1345, 784), (30, 784))
    assert _is_binary(val) and _is_binary(test) and not _is_binary(train)
    rows = data.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784).astype(np.float32)
    perm = np.random.RandomState(D.SPLIT_SEED).permutation(1400)
    assert torch.equal(train, torch.from_numpy(rows[perm][:55]))
    assert abs(test.mean().item() - testdata.mean()) < 0.02  # binarized from the right pixels
    again = spec.build({"mat": buf.getvalue()})
    assert torch.equal(again[1], val) and torch.equal(again[2], test)
    # In a data root, this file fails the official git blob checksum.
    (tmp_path / "OMNIGLOT").mkdir()
    (tmp_path / "OMNIGLOT/chardata.mat").write_bytes(buf.getvalue())
    [state] = file_states("omniglot", tmp_path)
    assert state.state == "corrupt" and "016a3536ffe5e1d38e42563a18d7a78bfaf643ec" in state.detail


def test_present_files_load_without_writing_or_locking(shared_datasets, monkeypatch):
    def no_lock(*args, **kwargs):
        raise AssertionError("a lock was taken although every file is present")

    monkeypatch.setattr(filelock, "FileLock", no_lock)
    before = _tree(shared_datasets)
    assert dataset_state("caltech101", shared_datasets) == "ok"
    load_dataset("frey_faces", shared_datasets)
    assert fetch("caltech101", shared_datasets) == [shared_datasets / CALTECH]
    assert _tree(shared_datasets) == before


# --- checksums and the state of a data root --------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_blob_sha1_equals_git_hash_object(shared_datasets, tmp_path):
    frey = shared_datasets / FREY
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello\n")
    for path in (frey, small):
        want = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert file_digest(path, "git-blob-sha1") == want
    assert bytes_digest(frey.read_bytes(), "git-blob-sha1") == "49f6866941bfaedd5be5444c64d440a885612e65"


def test_gz_stand_in_is_checked_on_decompressed_bytes(shared_datasets, tmp_path):
    src = shared_datasets / "MNIST_static/binarized_mnist_valid.amat.gz"
    shutil.copytree(shared_datasets / "MNIST_static", tmp_path / "MNIST_static")
    dst = tmp_path / "MNIST_static/binarized_mnist_valid.amat.gz"
    [_, valid, _] = file_states("static_mnist", tmp_path)
    assert valid.state == "ok" and valid.path == dst
    text = bytearray(gzip.decompress(src.read_bytes()))
    text[0] = ord("1") if text[0] == ord("0") else ord("0")  # one pixel flipped, still a valid .amat
    dst.write_bytes(gzip.compress(bytes(text), compresslevel=1))
    [_, valid, _] = file_states("static_mnist", tmp_path)
    assert valid.state == "corrupt"
    assert "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2" in valid.detail
    assert hashlib.sha256(bytes(text)).hexdigest() in valid.detail
    dst.write_bytes(src.read_bytes()[:100_000])  # truncated gzip
    assert file_states("static_mnist", tmp_path)[1].state == "corrupt"
    assert dataset_state("static_mnist", tmp_path) == "corrupt"
    with pytest.raises(DataError, match=r"corrupt .*Delete it and run `sweeper data fetch static_mnist`"):
        load_dataset("static_mnist", tmp_path, download=False)


def test_missing_file_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("frey_faces", tmp_path, download=False)
    assert str(tmp_path / FREY) in str(exc.value) and "sweeper data fetch frey_faces" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


# --- download over real HTTP ----------------------------------------------------------------------
def test_fetch_downloads_verifies_and_renames(file_server, shared_datasets, tmp_path, capsys):
    good = (shared_datasets / CALTECH).read_bytes()
    file_server.serve(CALTECH, good)
    paths = fetch("caltech101", tmp_path, base_url=file_server.url, progress=True)
    assert paths == [tmp_path / CALTECH]
    assert (tmp_path / CALTECH).read_bytes() == good
    assert _tree(tmp_path) == ["Caltech101Silhouettes", CALTECH]  # no temp, no lock left
    assert "100%" in capsys.readouterr().err  # the progress bar ran to the end
    s = load_dataset("caltech101", tmp_path, download=False)
    assert s.train.shape == (4100, 784)
    fetch("caltech101", tmp_path, base_url=file_server.url)
    assert file_server.hits["/" + CALTECH] == 1  # present and valid: not downloaded again


def test_load_dataset_downloads_from_the_mirror_env(file_server, shared_datasets, tmp_path, monkeypatch):
    file_server.serve(FREY, (shared_datasets / FREY).read_bytes())
    monkeypatch.setenv("SWEEPER_DATA_MIRROR", file_server.url + "/")
    s = load_dataset("frey_faces", tmp_path)
    ref = load_dataset("frey_faces", shared_datasets)
    assert torch.equal(s.train, ref.train) and torch.equal(s.test, ref.test)
    assert file_server.hits["/" + FREY] == 1


def test_wrong_bytes_raise_with_both_digests_and_leave_nothing(file_server, shared_datasets, tmp_path):
    bad = bytearray((shared_datasets / CALTECH).read_bytes())
    bad[5000] ^= 0xFF
    url = file_server.serve("bad.mat", bytes(bad))
    f = DATASETS["caltech101"].files["mat"]
    dest = tmp_path / "cache" / CALTECH
    with pytest.raises(DataError) as exc:
        download_file([url], dest, f.checksums, size=f.size)
    msg = str(exc.value)
    assert dest.name in msg and url in msg
    assert f.checksums["md5"] in msg and hashlib.md5(bad).hexdigest() in msg
    assert f.checksums["sha256"] in msg and hashlib.sha256(bad).hexdigest() in msg
    assert _tree(tmp_path) == []  # no file, no temp, no lock, not the folders made for it


def test_cut_transfer_and_404_fall_through_to_the_next_mirror(file_server, shared_datasets, tmp_path):
    good = (shared_datasets / FREY).read_bytes()
    cut = file_server.serve("cut.mat", good)
    file_server.truncate.add("/cut.mat")
    ok = file_server.serve("ok.mat", good)
    f = DATASETS["frey_faces"].files["mat"]
    dest = tmp_path / FREY
    with pytest.raises(DataError) as exc:
        download_file([file_server.url + "/gone.mat", cut], dest, f.checksums)
    assert "HTTP 404" in str(exc.value) and f"{cut}: connection closed after 550292 of 1100584 bytes" in str(exc.value)
    assert _tree(tmp_path) == []  # no partial file, no temp, no lock, no folder
    download_file([file_server.url + "/gone.mat", cut, ok], dest, f.checksums)
    assert dest.read_bytes() == good and _tree(dest.parent) == [dest.name]
    assert file_server.hits["/gone.mat"] == 2 and file_server.hits["/ok.mat"] == 1


def test_refused_connection_names_the_url_and_the_manual_path(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError) as exc:
        fetch("frey_faces", tmp_path, base_url=base)
    msg = str(exc.value)
    assert f"{base}/{FREY}" in msg and "refused" in msg.lower()
    assert str(tmp_path / FREY) in msg and "by hand" in msg
    assert f"The data folder is {tmp_path}" in msg and "point SWEEPER_DATA_DIR (or --root)" in msg
    assert _tree(tmp_path) == []  # not even the empty folder


MNIST_RAW = "MNIST/raw"


def test_a_failed_fetch_removes_the_folders_it_made_and_keeps_verified_files(file_server, shared_datasets,
                                                                             tmp_path):
    root = tmp_path / "fresh" / "data"           # nothing of it exists yet
    with pytest.raises(DataError) as exc:
        fetch("fashion_mnist", root, base_url=file_server.url)   # the server has none of its files
    assert "HTTP 404" in str(exc.value) and f"The data folder is {root}" in str(exc.value)
    assert _tree(tmp_path) == []                  # no <root>/FashionMNIST/raw/, no root
    # One file comes, the next one fails: the verified file stays (a retry fetches only the rest).
    names = [f.path for f in DATASETS["dynamic_mnist"].files.values()]
    assert names[0] == f"{MNIST_RAW}/train-images-idx3-ubyte.gz"
    file_server.serve(names[0], (shared_datasets / names[0]).read_bytes())
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        fetch("dynamic_mnist", root, base_url=file_server.url)
    assert _tree(tmp_path) == ["fresh", "fresh/data", "fresh/data/MNIST", f"fresh/data/{MNIST_RAW}",
                               f"fresh/data/{names[0]}"]
    for name in names[1:]:
        file_server.serve(name, (shared_datasets / name).read_bytes())
    fetch("dynamic_mnist", root, base_url=file_server.url)
    assert dataset_state("dynamic_mnist", root) == "ok"
    assert [file_server.hits["/" + name] for name in names] == [1, 2, 1, 1]


_FETCH_IN_CHILD = textwrap.dedent("""
    import sys
    from trainables.vae.data import fetch
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    fetch("caltech101", sys.argv[1], base_url=sys.argv[2], progress=False)
""")


def test_two_processes_fetching_at_once_download_once(file_server, shared_datasets, tmp_path):
    good = (shared_datasets / CALTECH).read_bytes()
    file_server.serve(CALTECH, good)
    file_server.delay = 1.0  # both processes are surely inside check-then-download together
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH_IN_CHILD, str(tmp_path), file_server.url],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert file_server.hits["/" + CALTECH] == 1
    assert (tmp_path / CALTECH).read_bytes() == good
    assert _tree(tmp_path) == ["Caltech101Silhouettes", CALTECH]
