"""The ``disk`` tier's config and files: entry paths, whole-file reads, atomic writes, the directory scan.

Kept apart from the tier so ``disk.py`` holds only cache semantics (index, capacity, eviction).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass

from ragkv.kvstore.chunk import check_key
from ragkv.kvstore.errors import ConfigError, TierUnavailable
from ragkv.kvstore.tiers.base import TierConfig

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
STALE_TMP_AGE_S = 600.0  # a temp file this old cannot belong to a live writer (an 8 MB write takes ms)
# "." and ".." are valid namespaces for check_key but are path components; '%' is outside the key alphabet,
# so the escaped spellings cannot collide with a real namespace.
NAMESPACE_DIRS = {".": "%2E", "..": "%2E%2E"}
DIR_NAMESPACES = {v: k for k, v in NAMESPACE_DIRS.items()}


@dataclass(frozen=True)
class DiskConfig(TierConfig):
    """``path``: the cache directory (created if missing). ``fsync``: fsync each file before its rename and
    the directory after, so a power loss keeps whole entries or none (off: faster puts, and a crash of the
    machine may lose recent entries, though never expose a partial one to a reader that validates).
    ``rescan_interval_s``: how often, at most, an over-capacity put re-reads sizes from the directory to
    account for other processes sharing it."""

    path: str = ""
    fsync: bool = True
    rescan_interval_s: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"DiskConfig.path is required: a non-empty directory path, got {self.path!r}")
        if not isinstance(self.fsync, bool):
            raise ConfigError(f"DiskConfig.fsync must be True or False, got {self.fsync!r}")
        if (not isinstance(self.rescan_interval_s, (int, float)) or isinstance(self.rescan_interval_s, bool)
                or self.rescan_interval_s < 0):
            raise ConfigError(f"DiskConfig.rescan_interval_s must be a number >= 0, got {self.rescan_interval_s!r}")


@dataclass(frozen=True)
class FileRead:
    data: bytes | bytearray
    identity: tuple[int, int]  # (st_dev, st_ino) of the file read, so we only delete that very file


def name_hash(name: str) -> str:
    """Fan-out hash of an entry name: stable across processes and machines (never Python's ``hash``)."""
    return hashlib.blake2b(name.encode(), digest_size=4).hexdigest()


def scan_entries(root: str) -> dict[str, tuple[int, float]]:
    """Walk ``<root>/<namespace>/<aa>/<bb>/`` -> {key: (size, mtime)}. Files that are not well-formed
    entries of this layout are left alone (the directory may hold other things); ``*.tmp`` files older
    than ``STALE_TMP_AGE_S`` are removed (younger ones may belong to a live writer elsewhere)."""
    found: dict[str, tuple[int, float]] = {}
    now = time.time()
    for ns_dir in _subdirs(root):
        namespace = DIR_NAMESPACES.get(ns_dir.name, ns_dir.name)
        for level1 in _subdirs(ns_dir.path):
            for level2 in _subdirs(level1.path):
                if len(level1.name) != 2 or len(level2.name) != 2:
                    continue  # not a fan-out directory: the name check below would reject its files anyway
                prefix = level1.name + level2.name
                for item in _scandir(level2.path):
                    _scan_file(item, namespace, prefix, now, found)
    return found

def _scan_file(item: os.DirEntry[str], namespace: str, prefix: str, now: float,
               found: dict[str, tuple[int, float]]) -> None:
    try:
        if not item.is_file(follow_symlinks=False):
            return
        if item.name.endswith(TMP_SUFFIX):
            if now - item.stat(follow_symlinks=False).st_mtime > STALE_TMP_AGE_S:
                unlink_quietly(item.path)
            return
        if not item.name.endswith(ENTRY_SUFFIX):
            return
        name = item.name[:-len(ENTRY_SUFFIX)]
        key = f"{namespace}:{name}"
        try:
            check_key(key)
        except ConfigError:
            return
        if name_hash(name)[:4] != prefix:
            return
        st = item.stat(follow_symlinks=False)
    except FileNotFoundError:  # removed by another process while we walked
        return
    found[key] = (st.st_size, st.st_mtime)


def read_file(path: str, as_bytes: bool) -> FileRead | None:
    """The whole file in one buffer sized by ``fstat`` (one allocation, no growth), or ``None`` if missing.

    ``as_bytes`` reads into a ``bytes`` object (for ``get_blob``, whose callers want immutable bytes) rather
    than a preallocated ``bytearray``; both are a single read of the file's size."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            data = f.read() if as_bytes else _read_into_bytearray(f, st.st_size)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TierUnavailable(f"cannot read {path}: {exc}") from exc
    return FileRead(data, (st.st_dev, st.st_ino))


def _read_into_bytearray(f: io.FileIO, size: int) -> bytearray:
    buf = bytearray(size)
    got = 0
    with memoryview(buf) as view:
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break  # shorter than fstat said: truncated in place; the checksum will say so
            got += n
    if got < size:
        del buf[got:]
    return buf


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    out = []
    for item in _scandir(path):
        try:
            if item.is_dir(follow_symlinks=False):
                out.append(item)
        except FileNotFoundError:
            continue
    return out


def fsync_dir(directory: str) -> None:
    """Make a rename or a new name in ``directory`` durable. Not possible on Windows (no O_DIRECTORY)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Remove a temp file we own or found stale; already gone is fine, other errors are logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("disk tier could not remove %s: %s", path, exc)




def write_atomically(root: str, path: str, blob: bytes | bytearray | memoryview, fsync: bool, tmp_name: str) -> None:
    """Temp file ``tmp_name`` in the target directory, write, fsync, rename over the entry, fsync the directory."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, tmp_name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        _make_dirs(root, directory, fsync)
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            view = memoryview(blob).cast("B")
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(directory)


def _make_dirs(root: str, directory: str, fsync: bool) -> None:
    """Create the fan-out directories; fsync the parents of new ones so the entry's path is durable."""
    new: list[str] = []
    d = directory
    while d != root and not os.path.isdir(d):
        new.append(d)
        d = os.path.dirname(d)
    os.makedirs(directory, exist_ok=True)
    if fsync:
        for d in new:
            fsync_dir(os.path.dirname(d))
