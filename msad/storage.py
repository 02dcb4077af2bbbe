"""Run storage that may be a local/NFS path or an object store URI (s3://bucket/prefix?endpoint_override=...).

Ray Train writes checkpoints there itself (pyarrow filesystems); this module covers the few files msad reads and
writes beside them (the run's config, final metrics, a teacher checkpoint a student needs), with the same URI rules
as Ray: `pyarrow.fs.FileSystem.from_uri`, so query options such as `endpoint_override` work for MinIO-like servers.

An object store can be down for a while (an outage, a network partition): an object-store operation that fails the
way an unreachable or overloaded store does is retried with backoff for `distributed.storage_retry_s`, then fails in
one line naming the file and the setting; other errors (a missing file, a denied access) are raised at once.
Each process says once that the store is failing and once that it is back, not once per attempt.

Every file Ray writes goes in whole or not at all (`ray_storage`): an object store puts whole objects, and a local or
NFS path gets a temp file renamed over the target, so a process killed mid-write never leaves a file a resume cannot
read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from msad import console
from msad.errors import UserError
from msad.files import cache_root, write_atomically

T = TypeVar("T")
DEFAULT_RETRY_S = 300.0  # distributed.storage_retry_s
_retry_s = DEFAULT_RETRY_S


class StorageUnavailableError(OSError):
    """An object-store operation kept failing for the whole retry window."""


def set_retry_window(seconds: float) -> None:
    """How long object-store operations of this process are retried (`distributed.storage_retry_s`)."""
    global _retry_s
    _retry_s = float(seconds)


class _Outage:
    """Says once per outage that the object store fails, and once that it answers again. An outage that ended is
    also published to the Ray cluster this process belongs to (`published_outages`): Train workers, Train's
    controller and trial drivers log elsewhere, and the sweep's terminal should hear of it."""

    since: float | None = None  # wall time the current outage began in this process
    first: tuple[str, str] = ("", "")  # what failed first in it, and how
    count = 0  # outages this process came through
    said_until = 0.0  # wall time up to which the outage last warned about lasted (inf while it lasts)

    @classmethod
    def failed(cls, what: str, err: OSError, consequence: str) -> None:
        if cls.since is not None:
            return
        cls.since, cls.first = time.time(), (what, first_line(err))
        if cls.since > cls.said_until + SAME_OUTAGE_S:
            console.current().warn(f"the object store failed ({what}: {first_line(err)}); {consequence}")
        cls.said_until = float("inf")

    @classmethod
    def answered(cls) -> None:
        if cls.since is None:
            return
        now = time.time()
        console.current().event(f"the object store answers again after {now - cls.since:.0f} s")
        cls.count += 1
        _publish({"start": cls.since, "seconds": now - cls.since, "what": f"{cls.first[0]}: {cls.first[1]}"},
                 cls.count)
        cls.since, cls.said_until = None, now


SAME_OUTAGE_S = 30.0  # failures this close to an outage already told are the same outage


def outage_met(what: str, err: OSError, consequence: str) -> None:
    """An object-store failure that the caller handles itself (e.g. by trying again later): told once per outage,
    with every other failure of this process and of the cluster's other processes."""
    _Outage.failed(what, err, consequence)


def outage_over() -> None:
    """The store answered the caller again after `outage_met` (said once, if nothing else said it)."""
    _Outage.answered()


OUTAGE_KEY_PREFIX = "msad-storage-outage-"


def _publish(record: dict[str, float | str], count: int) -> None:
    """Put an ended outage in the Ray cluster's key-value store, when this process is part of one."""
    try:
        import ray
        from ray.experimental.internal_kv import _internal_kv_put

        if ray.is_initialized():
            key = f"{OUTAGE_KEY_PREFIX}{socket.gethostname()}-{os.getpid()}-{count}"
            _internal_kv_put(key, json.dumps(record), namespace="msad")
    except Exception:  # noqa: BLE001 (telling of an outage must never fail the work that came through it)
        pass


def published_outages() -> dict[str, dict[str, float | str]]:
    """Every outage the processes of this Ray cluster came through, by key (nothing without Ray)."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    if not ray.is_initialized():
        return {}
    keys = _internal_kv_list(OUTAGE_KEY_PREFIX, namespace="msad")
    return {key.decode(): json.loads(value) for key in keys
            if (value := _internal_kv_get(key, namespace="msad")) is not None}


def notice_outage(record: dict[str, float | str]) -> None:
    """One warning line for an outage another process came through, unless this process already told of it."""
    start, seconds = record["start"], record["seconds"]
    assert isinstance(start, float) and isinstance(seconds, float)
    if start <= _Outage.said_until + SAME_OUTAGE_S:
        return
    console.current().warn(f"the object store failed for {seconds:.0f} s ({record['what']}); training waited and "
                           "went on: nothing lost")
    _Outage.said_until = start + seconds


# What pyarrow's S3/GCS clients say when the store is unreachable, overloaded or cut the connection; AWS's own retry
# classes (NETWORK_CONNECTION, SLOW_DOWN, throttling, 5xx) and libcurl's. Anything else is an answer, not an outage.
TRANSIENT = re.compile(r"NETWORK_CONNECTION|curlCode|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTL|INTERNAL_FAILURE|"
                       r"REQUEST_TIME_?OUT|HTTP status 5\d\d|[Tt]imed? ?out|Connection (reset|refused)|Broken pipe|"
                       r"Could not connect|Couldn't connect")


def transient(err: OSError) -> bool:
    """Whether `err` looks like an outage (worth retrying) rather than an answer (a missing file, a denied access)."""
    return not isinstance(err, FileNotFoundError) and (isinstance(err, (ConnectionError, TimeoutError))
                                                        or bool(TRANSIENT.search(str(err))))


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def retrying(what: str, operation: Callable[[], T], retry_s: float | None = None,
             sleep: Callable[[float], None] = time.sleep, tell: bool = True) -> T:
    """`operation()`, retried with backoff (0.5 s doubling to 10 s) while it raises OSError, for at most `retry_s`
    (default: this process's `distributed.storage_retry_s`); then a StorageUnavailableError naming `what`. Only
    errors of an unreachable or overloaded store are retried: a missing file, a denied access or a wrong bucket are
    answers, raised at once. `tell`: say so once per outage (and publish it to the cluster)."""
    window = _retry_s if retry_s is None else retry_s
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            result = operation()
        except OSError as err:
            if not transient(err):
                raise
            if tell:
                _Outage.failed(what, err, f"msad retries for up to {window:.0f} s (distributed.storage_retry_s) "
                                          "and keeps training")
            elapsed = time.monotonic() - start
            if elapsed + delay > window:
                raise StorageUnavailableError(f"{what}: the object store kept failing for {elapsed:.0f} s "
                                              f"(distributed.storage_retry_s = {window:g}): {first_line(err)}") from err
            sleep(delay)
            delay = min(2 * delay, 10.0)
        else:
            if tell:
                _Outage.answered()
            return result


FIRST_CONTACT_S = 20.0  # how long a store that never answered is given before anything starts


def check_reachable(location: str, what: str = "distributed.storage_path", within: float = FIRST_CONTACT_S) -> None:
    """Refuse, in one line, an object store that does not answer at all before anything starts. A wrong
    `endpoint_override` or host fails like an outage (connection refused), and the retry window
    (`distributed.storage_retry_s`, minutes) is for outages in the middle of a run, where waiting saves work; here it
    would only delay the message. A bucket that does not exist is refused too; one the credentials may not look at
    (prefix-only access) passes: it answered. Plain paths pass (local or NFS: checked elsewhere)."""
    if not is_uri(location):
        return
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        found = retrying(f"reaching {location}", lambda: fs.get_file_info(bucket), retry_s=within, tell=False)
    except StorageUnavailableError as err:
        cause = first_line(err.__cause__) if err.__cause__ else first_line(err)
        raise UserError(f"{what}: {location} did not answer in {within:g} s ({cause}); check the bucket's endpoint "
                        "(endpoint_override=...), its host and the network") from err
    except OSError:  # an answer (e.g. access denied to the bucket itself, as prefix-only credentials get): reachable
        return
    if found.type == pafs.FileType.NotFound:
        raise UserError(f"{what}: {location}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                        "create it first")


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


def ray_storage(location: str) -> tuple[str, pafs.FileSystem]:
    """`storage_path` and `storage_filesystem` for Ray's RunConfigs (Tune's and Train's). An object store goes behind
    `RetryingHandler`, so that Ray's own writes (checkpoint uploads, its checkpoint list) wait out an outage; a local
    or NFS path behind `AtomicLocalHandler`, so that a process killed while Ray writes its state (a SIGKILLed driver,
    a lost node) leaves the previous version of a file, never an empty or half one that a resume cannot read."""
    if not is_uri(location):
        return resolve(location), pafs.PyFileSystem(AtomicLocalHandler())
    _, path = pafs.FileSystem.from_uri(location)
    return path, pafs.PyFileSystem(RetryingHandler(location, _retry_s))


def local_folder(fs: pafs.FileSystem, path: str) -> Path | None:
    """`path` as a folder on this machine when `fs` is the local disk (pyarrow's, or msad's `AtomicLocalHandler`),
    else None. Read a local checkpoint where it is: Ray's `Checkpoint.as_directory()` copies any other filesystem's
    into a temp folder named by the checkpoint's id, which the workers of a node share and a reader that stops early
    leaves behind (a two-worker run that restored through it hung: one worker evaluating, the other reporting)."""
    local = isinstance(fs, pafs.LocalFileSystem) or (
        isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, AtomicLocalHandler))
    return Path(path) if local else None


class _PassThroughHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that hands every call to the filesystem it wraps (`fs`) through `_call`; the
    subclasses change how a call is made (retried) and how files are opened (whole transfers, renamed on close)."""

    @property
    @abstractmethod
    def fs(self) -> pafs.FileSystem:
        """The filesystem every call is handed to."""

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        return operation()

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._call(f"looking up {paths[0] if len(paths) == 1 else f'{len(paths)} paths'}",
                          lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._call(f"listing {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call(f"creating {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._call(f"deleting {path}", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call(f"deleting in {path}", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._call("deleting everything", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._call(f"deleting {path}", lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._call(f"moving {src}", lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._call(f"copying {src}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._call(f"reading {path}", lambda: self.fs.open_input_stream(path, compression=None))

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._call(f"reading {path}", lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        return self._call(f"writing {path}", lambda: self.fs.open_output_stream(path, compression=None,
                                                                                metadata=metadata))

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        return self._call(f"appending to {path}", lambda: self.fs.open_append_stream(path, compression=None,
                                                                                     metadata=metadata))


class AtomicLocalHandler(_PassThroughHandler):
    """The local filesystem (or an NFS mount), where a file written or copied goes to a hidden temp file beside it,
    synced and renamed over the target when closed: a reader, or a run resumed after its writer was SIGKILLed,
    finds the previous file or the whole new one. Ray writes its resume state in place (Tune's
    experiment_state-*.json and searcher state, Train's checkpoint-manager snapshot), so a driver killed in the
    middle of a write used to leave them empty, and `--resume` started the experiment over."""

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships RunConfig to its controller and workers
        return AtomicLocalHandler, ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    @property
    def fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def get_type_name(self) -> str:
        return "msad-atomic+local"

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.PythonFile:
        return pa.PythonFile(_RenameOnClose(Path(path)), mode="w")

    def copy_file(self, src: str, dest: str) -> None:
        with open(src, "rb") as source, _RenameOnClose(Path(dest)) as target:
            shutil.copyfileobj(source, target, 1 << 20)


class _WriteOnce:
    """A write-only file for `pyarrow.PythonFile` that collects the bytes in `backing` and does its real work
    (a rename, a put) when closed."""

    def __init__(self, backing: IO[bytes]) -> None:
        self.backing = backing
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.backing.write(data)

    def tell(self) -> int:
        return self.backing.tell()

    def flush(self) -> None:
        self.backing.flush()

    def writable(self) -> bool:
        return True


class _RenameOnClose(_WriteOnce):
    """A file written under a unique hidden name beside `path` (created with the umask's permissions, as any other
    file), renamed over `path` once it is closed whole. A writer killed before that leaves a `.<name>.*.partial`
    file, which no reader of Ray's or msad's files lists, and `path` as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
        super().__init__(os.fdopen(os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb"))

    def close(self, keep: bool = True) -> None:
        """Put the file in place (`keep`), or drop it (a copy that failed half-way)."""
        if self.closed:
            return
        self.closed = True
        try:
            if keep:
                self.backing.flush()
                os.fsync(self.backing.fileno())
                self.backing.close()
                os.replace(self.partial, self.path)
        finally:
            self.backing.close()
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> _RenameOnClose:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(keep=kind is None)


class RetryingHandler(_PassThroughHandler):
    """An object-store filesystem whose every call is retried through an outage (`retrying`).

    Transfers are whole files, so that a connection cut half-way is retried too: a file opened for writing is
    spooled locally and put in one retried call when it is closed; a file opened for reading is fetched whole
    (retried) into a local spool first. Spools stay in memory up to 64 MiB, then go to a temp file.
    """

    SPOOL_BYTES = 64 << 20

    def __init__(self, location: str, retry_s: float) -> None:
        self.location, self.retry_s = location, retry_s
        self._fs: pafs.FileSystem | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships RunConfig to its controller and workers
        return RetryingHandler, (self.location, self.retry_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingHandler) and other.location == self.location

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = pafs.FileSystem.from_uri(self.location)[0]
        return self._fs

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        return retrying(what, operation, self.retry_s)

    def get_type_name(self) -> str:
        return f"msad-retrying+{self.fs.type_name}"

    def _fetch(self, path: str) -> pa.PythonFile:
        spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES)  # noqa: SIM115 (PythonFile closes it)

        def fetch() -> None:
            spool.seek(0)
            spool.truncate()
            with self.fs.open_input_stream(path, compression=None) as stream:
                shutil.copyfileobj(stream, spool, 1 << 20)

        self._call(f"reading {path}", fetch)
        spool.seek(0)
        return pa.PythonFile(spool, mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        return self._fetch(path)

    def open_input_file(self, path: str) -> pa.PythonFile:
        return self._fetch(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.PythonFile:
        return pa.PythonFile(_PutOnClose(self, path, metadata), mode="w")


class _PutOnClose(_WriteOnce):
    """A file being written to an object store: spooled, then put whole (retried) when closed."""

    def __init__(self, handler: RetryingHandler, path: str, metadata: dict[str, str] | None) -> None:
        self.handler, self.path, self.metadata = handler, path, metadata
        super().__init__(tempfile.SpooledTemporaryFile(max_size=handler.SPOOL_BYTES))  # noqa: SIM115

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def put() -> None:
            self.backing.seek(0)
            with self.handler.fs.open_output_stream(self.path, compression=None, metadata=self.metadata) as stream:
                shutil.copyfileobj(self.backing, stream, 1 << 20)

        try:
            self.handler._call(f"writing {self.path}", put)
        finally:
            self.backing.close()


def uri_for(fs_path: str, like: str) -> str:
    """Turn a path inside `like`'s filesystem (what Ray's Checkpoint.path holds) back into a full location."""
    if not is_uri(like):
        return fs_path
    scheme = like.split("://", 1)[0]
    _, sep, query = like.partition("?")
    return f"{scheme}://{fs_path}" + (sep + query if sep else "")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    if not is_uri(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    return retrying(f"checking {location}", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retrying(f"reading {location}", read) if is_uri(location) else read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temp file + rename, object stores put whole objects."""
    if not is_uri(location):
        write_atomically(Path(location), lambda f: f.write(data))
        return
    fs, path = filesystem(location)

    def write() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    retrying(f"writing {location}", write)


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
