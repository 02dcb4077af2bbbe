"""Run storage that may be a local/NFS path or an object store URI (s3://bucket/prefix?endpoint_override=...).

Ray Train writes checkpoints there itself (pyarrow filesystems); this module covers the few files msad reads and
writes beside them (the run's config, final metrics, a teacher checkpoint a student needs), with the same URI rules
as Ray: `pyarrow.fs.FileSystem.from_uri`, so query options such as `endpoint_override` work for MinIO-like servers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs

from msad.files import cache_root, write_atomically


def is_uri(location: str | Path) -> bool:
    """True for scheme://... locations (s3, gs, ...); plain paths are local or NFS."""
    return "://" in str(location)


def resolve(location: str | Path) -> str:
    """Absolute local path, or the URI unchanged."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Append path parts to a path or a URI (before its ?query)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + (sep + query if sep else "")


def sibling(location: str, name: str) -> str:
    """The file `name` in the same folder as `location` (a path, or a URI whose ?query is kept)."""
    if not is_uri(location):
        return str(Path(location).with_name(name))
    head, sep, query = location.partition("?")
    return head.rstrip("/").rsplit("/", 1)[0] + "/" + name + (sep + query if sep else "")


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a location (as Ray resolves storage_path)."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), resolve(location)


def uri_for(fs_path: str, like: str) -> str:
    """Turn a path inside `like`'s filesystem (what Ray's Checkpoint.path holds) back into a full location."""
    if not is_uri(like):
        return fs_path
    scheme = like.split("://", 1)[0]
    _, sep, query = like.partition("?")
    return f"{scheme}://{fs_path}" + (sep + query if sep else "")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temp file + rename, object stores put whole objects."""
    if not is_uri(location):
        write_atomically(Path(location), lambda f: f.write(data))
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def local_copy(location: str, cache_dir: Path | None = None, sidecars: tuple[str, ...] = ()) -> Path:
    """A local file for `location`: the path itself, or a download cached by the URI's hash (with sidecar files).

    A cached copy whose sidecars are byte-identical to the stored ones (e.g. a SHA-256 file) is used again without
    downloading the file: a node downloads a teacher once, however many processes read it. Without sidecars the
    file is downloaded on every call."""
    if not is_uri(location):
        return Path(location)
    cache_dir = cache_dir or cache_root() / "downloads"
    folder = cache_dir / hashlib.sha256(location.encode()).hexdigest()[:16]
    name = location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
    stored = {suffix: read_bytes(_with_suffix(location, suffix)) for suffix in sidecars
              if exists(_with_suffix(location, suffix))}
    cached = folder / name
    if stored and cached.is_file() and all(
            (folder / (name + suffix)).is_file() and (folder / (name + suffix)).read_bytes() == data
            for suffix, data in stored.items()):
        return cached
    for suffix in ("", *sidecars):
        source = _with_suffix(location, suffix)
        if suffix and not exists(source):
            continue
        write_bytes(str(folder / (name + suffix)), read_bytes(source))
    return folder / name


def _with_suffix(location: str, suffix: str) -> str:
    head, sep, query = location.partition("?")
    return head + suffix + (sep + query if sep else "")
