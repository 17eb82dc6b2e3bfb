"""On-disk cache of index arrays (GPT sample indices, blend indices), safe for many ranks.

Each cache entry is one file, `{name}-{hash}.indices`, where the hash covers a description of
everything that affects the arrays. The file holds a small header (magic, the description and
the layout of each array as JSON) followed by the raw arrays at 64-byte aligned offsets, so
opening it is one small read plus one memory map: no copy, whatever the size of the arrays.

Concurrency, without locks (file locks are unreliable on the network filesystems clusters
use): the file is written under a temporary name in the cache directory and renamed into
place, so a reader sees a whole entry or none. Building is deterministic, so if several
processes build the same entry at once they write identical bytes and whichever rename lands
last wins. The intended pattern is still to build once: the one process with `create=True`
builds, everyone meets at a barrier, and the others open the file with `create=False`
(without a barrier they poll until it appears). Opened arrays are read-only memory maps, shared
through the page cache by every rank on a node.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

import numpy as np

CACHE_FORMAT = 1  # bump when the meaning of any cached array changes
DEFAULT_WAIT_SECONDS = 1800.0
_MAGIC = b"PTIDXC01"
_PREFIX = struct.Struct("<8sQ")  # magic, header length
_ALIGN = 64


class CacheError(ValueError):
    """A cache file exists but is not a complete, matching entry."""


def cache_path(directory: str, name: str, description: dict) -> str:
    text = json.dumps({"cache_format": CACHE_FORMAT, **description}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return os.path.join(directory, f"{name}-{key}.indices")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def write_entry(path: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write one cache entry atomically (temporary file in the same directory, then rename)."""
    directory = os.path.dirname(path)
    layout, offset, blobs = {}, 0, []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        layout[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        blobs.append((offset, arr))
        offset = _aligned(offset + arr.nbytes)
    header = json.dumps(
        {"cache_format": CACHE_FORMAT, "description": description, "arrays": layout}, sort_keys=True
    ).encode()
    data_start = _aligned(_PREFIX.size + len(header))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(_MAGIC, len(header)) + header)
            for rel, arr in blobs:
                f.seek(data_start + rel)
                f.write(arr.data)
            f.truncate(data_start + offset)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable by the other users of a shared cluster
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_entry(path: str, description: dict) -> dict[str, np.ndarray]:
    """Memory-map the arrays of an entry; CacheError if it is damaged or describes other data."""
    with open(path, "rb") as f:
        head = f.read(_PREFIX.size)
        if len(head) < _PREFIX.size:
            raise CacheError(f"{path}: truncated cache file")
        magic, header_len = _PREFIX.unpack(head)
        if magic != _MAGIC or header_len > 1 << 24:
            raise CacheError(f"{path}: not an index cache file")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CacheError(f"{path}: damaged cache header") from None
        if header.get("cache_format") != CACHE_FORMAT or header.get("description") != description:
            raise CacheError(f"{path}: cache entry describes other data or an older format")
        size = os.fstat(f.fileno()).st_size
        data_start = _aligned(_PREFIX.size + header_len)
        arrays = {}
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > data_start else None
    try:
        for name, spec in header["arrays"].items():
            dtype, shape = np.dtype(spec["dtype"]), tuple(int(n) for n in spec["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            start = data_start + int(spec["offset"])
            if count == 0:
                arrays[name] = np.empty(shape, dtype=dtype)
                continue
            if mapped is None or start + count * dtype.itemsize > size:
                raise CacheError(f"{path}: truncated cache file (array {name!r} runs past its end)")
            arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=start).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CacheError):
            raise
        raise CacheError(f"{path}: damaged cache header ({exc})") from None
    return arrays


def cached_arrays(
    directory: str,
    name: str,
    description: dict,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    create: bool = True,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
) -> tuple[dict[str, np.ndarray], bool]:
    """Return (arrays, built): the arrays for `description`, memory-mapped from the cache.

    On a miss, `create=True` calls `build()`, stores its arrays and returns them (freshly built
    arrays are returned as they are, not re-read); `create=False` waits up to `wait_seconds`
    for another process to store them, then raises TimeoutError.
    """
    path = cache_path(directory, name, description)
    damage: CacheError | None = None
    try:
        return read_entry(path, description), False
    except CacheError as exc:
        damage = exc
    except OSError:  # missing (or unreadable: then writing it below fails with a clear message)
        pass
    if not create:
        deadline = time.monotonic() + wait_seconds
        delay = 0.02
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                return read_entry(path, description), False
            except CacheError as exc:
                damage = exc
            except OSError:
                pass
        why = f" ({damage})" if damage else ""
        raise TimeoutError(
            f"index cache {path} did not appear within {wait_seconds:.0f} s{why}; the process "
            "that builds it (create=True, usually global rank 0) failed or was not started"
        )
    arrays = build()
    try:
        os.makedirs(directory, exist_ok=True)
        write_entry(path, description, arrays)
    except OSError as exc:
        raise ValueError(
            f"cannot write the dataset index cache {path!r} ({exc.strerror or exc}); point the "
            "cache directory (cache_dir, data.cache_dir) at a writable location"
        ) from None
    return arrays, True
