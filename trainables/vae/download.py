"""Files of official datasets: checksums, the data root, and a checksummed, locked download.

The machinery under `trainables/vae/data.py` (the dataset catalog): it knows files, not
datasets. A file is named by its place in the data root, its official URLs and its pinned
checksums (`DataFile`); it is "ok" when its bytes (decompressed if stored as NAME.gz) match them.
A download goes to a temporary file beside the destination, is checked, then renamed: a failed
or interrupted download leaves no file behind (nor the folders it created for it), and a lock lets
one process fetch while others wait.

Data root: an explicit `root` > env `SWEEPER_DATA_DIR` > the per-user cache folder.
Mirrors: env `SWEEPER_DATA_MIRROR=<base URL>` replaces the official URLs by `<base URL>/<path in
the layout>` (clusters without internet, tests).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from trainables.vae.errors import DataError

DATA_DIR_ENV = "SWEEPER_DATA_DIR"
MIRROR_ENV = "SWEEPER_DATA_MIRROR"
CHECKSUM_KINDS = ("sha256", "md5", "git-blob-sha1")
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole file
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------
def _hasher(kind: str, size: int):
    if kind == "sha256":
        return hashlib.sha256()
    if kind == "md5":
        return hashlib.md5(usedforsecurity=False)
    if kind == "git-blob-sha1":
        # Git's blob id: sha1 over a "blob <size>\0" header and the content (`git hash-object`).
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h
    raise ValueError(f"unknown checksum kind {kind!r}; choose one of {CHECKSUM_KINDS}")


def bytes_digest(data: bytes, kind: str) -> str:
    """Hex digest of `data`; `kind` is "sha256", "md5" or "git-blob-sha1" (= `git hash-object`)."""
    h = _hasher(kind, len(data))
    h.update(data)
    return h.hexdigest()


def file_digests(path: str | Path, kinds: Iterable[str]) -> dict[str, str]:
    """Digests of one file for several kinds, reading it once in chunks."""
    path = Path(path)
    hashers = {kind: _hasher(kind, path.stat().st_size) for kind in kinds}
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {kind: h.hexdigest() for kind, h in hashers.items()}


def file_digest(path: str | Path, kind: str) -> str:
    """Hex digest of one file (see `bytes_digest` for the kinds)."""
    return file_digests(path, [kind])[kind]


def _mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    return [f"{kind} expected {want}, got {actual[kind]}"
            for kind, want in expected.items() if actual[kind] != want.lower()]


@dataclass(frozen=True)
class DataFile:
    """One official file: where it lives in the data root, where to get it, how to check it."""

    path: str                     # relative to the data root, '/'-separated, official file name
    urls: tuple[str, ...]         # official URL first, then mirrors, tried in order
    checksums: Mapping[str, str]  # kind -> hex digest of the official bytes (see CHECKSUM_KINDS)
    size: int | None = None       # bytes of the official file, when pinned



# --------------------------------------------------------------------------------------------------
# Data root and file state
# --------------------------------------------------------------------------------------------------
def resolve_root(root: str | Path | None = None) -> Path:
    """Explicit `root` > env SWEEPER_DATA_DIR > the per-user cache folder; absolute."""
    if root is None or str(root) == "":
        root = os.environ.get(DATA_DIR_ENV) or None
    if root is None:
        from platformdirs import user_cache_path

        root = user_cache_path("sweeper", appauthor=False) / "datasets"
    return Path(root).expanduser().resolve()


@dataclass(frozen=True)
class FileState:
    """State of one official file in a data root; `path` is where it is (or would be)."""

    path: Path
    state: str        # "ok", "missing" or "corrupt"
    detail: str = ""  # why it is corrupt


class CorruptFile(Exception):
    """A file whose bytes do not match its official checksums (the message says how)."""


def locate(f: DataFile, root: Path) -> tuple[Path, bool] | None:
    """(path, stored gzipped as a stand-in) of the file in `root`, or None when absent."""
    plain = root / f.path
    if plain.is_file():
        return plain, False
    packed = plain.with_name(plain.name + ".gz")
    if packed.is_file():
        return packed, True
    return None


def official_bytes(f: DataFile, path: Path, packed: bool) -> bytes:
    """The official file's bytes (decompressing a NAME.gz stand-in), checked; `CorruptFile` if not."""
    if not packed and f.size is not None and path.stat().st_size != f.size:
        raise CorruptFile(f"{path.stat().st_size} bytes, expected {f.size}")  # cheap: no read
    try:
        data = path.read_bytes()
        if packed:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFile(f"unreadable ({type(exc).__name__}: {exc})") from None
    if f.size is not None and len(data) != f.size:
        raise CorruptFile(f"{len(data)} bytes, expected {f.size}")
    bad = _mismatches(f.checksums, {kind: bytes_digest(data, kind) for kind in f.checksums})
    if bad:
        raise CorruptFile("; ".join(bad))
    return data


def file_state(f: DataFile, root: Path) -> FileState:
    found = locate(f, root)
    if found is None:
        return FileState(root / f.path, "missing")
    try:
        official_bytes(f, *found)
    except CorruptFile as exc:
        return FileState(found[0], "corrupt", str(exc))
    return FileState(found[0], "ok")



# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------
def _stream(url: str, tmp, label: str, size: int | None, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "vampprior-sweeper"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        announced = int(response.headers.get("Content-Length") or 0)
        received = 0
        with tqdm(total=announced or size, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  file=sys.stderr, disable=not progress) as bar:
            while chunk := response.read(_CHUNK):
                tmp.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if announced and received != announced:
            # http.client returns a short body silently when the server closes early; say so.
            raise ConnectionError(f"connection closed after {received} of {announced} bytes")


def _download_one(url: str, dest: Path, checksums: Mapping[str, str], size: int | None,
                  progress: bool, timeout: float) -> None:
    # A unique temp file in the destination folder: os.replace is then an atomic rename on the
    # same file system, and a crash leaves at worst a hidden .part, never a half file at `dest`.
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False)
    tmp_path = Path(tmp.name)
    try:
        with tmp:
            _stream(url, tmp, dest.name, size, progress, timeout)
        actual = file_digests(tmp_path, checksums)
        bad = _mismatches(checksums, actual)
        if bad:
            raise CorruptFile(f"checksum mismatch for {dest.name} downloaded from {url}: {'; '.join(bad)}; "
                           "the download was discarded")
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _make_folder(folder: Path, created: list[Path]) -> None:
    """mkdir -p `folder`, adding what it creates to `created` (deepest first)."""
    created[:0] = [f for f in _missing_folders(folder) if f not in created]
    folder.mkdir(parents=True, exist_ok=True)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed download created (deepest first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty: another process's file is there, and so in every parent


def data_root_hint(root: Path) -> str:
    """Where the data folder comes from, and how to point it at files already on this machine."""
    return (f"The data folder is {root} (--root, else ${DATA_DIR_ENV}, else the per-user cache): "
            f"if the datasets are elsewhere on this machine, point {DATA_DIR_ENV} (or --root) at "
            f"that folder.")


def download_file(urls: Sequence[str], dest: str | Path, checksums: Mapping[str, str], *,
                  size: int | None = None, progress: bool | None = None,
                  timeout: float = DOWNLOAD_TIMEOUT_S, root: str | Path | None = None) -> Path:
    """Download the first URL that works to `dest`, verify `checksums`, rename atomically.

    A file lock on `<dest>.lock` makes concurrent processes download once: the others wait,
    then find the finished file. `progress`: a tqdm bar on stderr (default: when stderr is a tty).
    Raises `DataError` naming each URL tried, where to put the file by hand and (given the data
    `root` that `dest` is in) how to point the data folder elsewhere; a failed download leaves
    neither a file nor the folders it created.
    """
    from filelock import FileLock

    dest = Path(dest)
    progress = sys.stderr.isatty() if progress is None else progress
    manual = (f"Download it by hand and put it at {dest} "
              f"(expected {', '.join(f'{k} {v}' for k, v in checksums.items())}).")
    if root is not None:
        manual += " " + data_root_hint(Path(root))
    created: list[Path] = []
    try:
        _make_folder(dest.parent, created)
        lock = FileLock(f"{dest}.lock")
        lock.acquire()
    except OSError as exc:
        _remove_empty(created)
        raise DataError(f"cannot write to {dest.parent} ({exc}); set {DATA_DIR_ENV} or --root to a "
                        f"writable folder, or: {manual}") from None
    done = False
    try:
        if dest.is_file():  # another process finished while we waited for the lock
            bad = _mismatches(checksums, file_digests(dest, checksums))
            if bad:
                raise DataError(f"{dest} is corrupt ({'; '.join(bad)}). Delete it and fetch again.")
            done = True
            return dest
        # Another process's failed download may have removed the folder while we waited.
        _make_folder(dest.parent, created)
        failures = []
        for url in urls:
            try:
                _download_one(url, dest, checksums, size, progress, timeout)
                done = True
                return dest
            except CorruptFile as exc:
                failures.append(str(exc))
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                # URLError wraps the socket error (refused, DNS, timeout) in .reason
                failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        tried = "\n  - ".join(failures) if failures else "(no URL given)"
        raise DataError(f"could not download {dest.name}:\n  - {tried}\n{manual}")
    finally:
        # Remove the lock file so a failed download leaves nothing behind. Safe: whoever gets
        # the lock next re-checks `dest` before downloading, so a finished file is never fetched
        # twice; at worst two processes retry a failed download at once, each into its own temp.
        Path(f"{dest}.lock").unlink(missing_ok=True)
        if not done:
            _remove_empty(created)   # still under the lock: a waiting process re-creates them
        lock.release()


def urls_of(f: DataFile, base_url: str | None) -> tuple[str, ...]:
    base = base_url or os.environ.get(MIRROR_ENV) or None
    return (f"{base.rstrip('/')}/{f.path}",) if base else f.urls
