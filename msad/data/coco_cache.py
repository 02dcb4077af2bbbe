"""A COCO instances file as flat numpy arrays, parsed once per file digest and memory-mapped by every worker.

Parsing COCO-2017 train's 394 MB of JSON takes about 14 s and 3.4 GB in each process that does it; what a training
dataset needs of it (image ids, sizes, file names, boxes, labels, crowd flags, offsets) is about 25 MB of arrays.
So the first process that needs a file parses it, under a file lock while the others wait, and writes the arrays as
one cache file (temp file + rename, so a reader never sees half a file); every later process maps that file
read-only. Mapped pages are shared by all workers of a node and the DataLoader processes they fork, and no Python
object per image or box exists to be copied page by page on fork.

The cache's name holds the SHA-256 of the annotation file, so a changed file gets a new cache and the old one is
never read for it. Its header holds that digest in full, the format version and a SHA-256 of the arrays: a
truncated, corrupt or foreign cache file is reported (one warning) and rebuilt. Bump CACHE_VERSION whenever the
arrays' meaning changes (e.g. how boxes are clipped), so that caches written by older code are not used.

This module imports numpy only (no torch), so small tools and tests can build caches cheaply.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from msad.errors import UserError
from msad.files import cache_root, file_sha256, write_atomically

CACHE_VERSION = 1
_MAGIC = b"MSADCOCO"
_ALIGN = 64  # every array starts on a 64-byte boundary of the file
# name -> dtype of the arrays stored, in file order
_ARRAYS = {
    "image_ids": np.dtype("<i8"),  # [I] COCO image ids, in the file's order
    "sizes": np.dtype("<i4"),  # [I, 2] (height, width) from the JSON
    "name_offsets": np.dtype("<i8"),  # [I + 1] file name i is names[name_offsets[i]:name_offsets[i + 1]]
    "names": np.dtype("u1"),  # UTF-8 file names back to back
    "box_offsets": np.dtype("<i8"),  # [I + 1] image i's boxes are boxes[box_offsets[i]:box_offsets[i + 1]]
    "boxes": np.dtype("<f4"),  # [A, 4] xyxy pixels clipped to the image, in file order within an image
    "labels": np.dtype("<i4"),  # [A] contiguous labels 0..C-1 (sorted category ids)
    "crowd": np.dtype("?"),  # [A] iscrowd regions (not training targets)
}


def default_cache_dir() -> Path:
    """$MSAD_CACHE/coco_index (default ~/.cache/msad/coco_index): the node-local folder of annotation caches."""
    return cache_root() / "coco_index"


@dataclass(frozen=True)
class CocoArrays:
    """What a detection dataset needs of a COCO instances file (arrays are read-only when memory-mapped).

    Boxes that are crowd regions are kept with their flag; non-crowd boxes left with zero width or height after
    clipping to the image are dropped (counted in `num_degenerate`): they have no interior point to assign.

    Attributes:
        source_sha256: SHA-256 of the annotation file the arrays were parsed from.
        category_ids: the sorted COCO category ids; label i is category_ids[i].
        category_names: their names, in label order.
        num_degenerate: non-crowd boxes dropped as degenerate.
        parsed: True when this process parsed the JSON (no valid cache was there); False when read from a cache.
    """

    image_ids: np.ndarray
    sizes: np.ndarray
    name_offsets: np.ndarray
    names: np.ndarray
    box_offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    source_sha256: str
    category_ids: list[int]
    category_names: list[str]
    num_degenerate: int
    parsed: bool

    def file_name(self, index: int) -> str:
        return bytes(self.names[self.name_offsets[index]:self.name_offsets[index + 1]]).decode()


def read_annotation_json(annotation_file: Path) -> tuple[dict[str, Any], str]:
    """The parsed, checked instances file and the SHA-256 of the bytes parsed; one-line UserError when unusable."""
    if not annotation_file.is_file():
        raise UserError(f"annotation file not found: {annotation_file}")
    raw = annotation_file.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        del raw  # the text and the parsed objects are what peak together, not the bytes too
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file {annotation_file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"annotation file {annotation_file} is not a COCO object (a JSON {type(data).__name__})")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise UserError(f"annotation file {annotation_file} lacks the COCO list(s) {missing}")
    if not data["categories"]:
        raise UserError(f"annotation file {annotation_file} has no categories")
    return data, digest


def parse_annotations(annotation_file: Path) -> CocoArrays:
    """Parse the JSON into arrays (no cache involved)."""
    data, digest = read_annotation_json(annotation_file)
    try:
        category_ids = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        images = data["images"]
        image_ids = np.array([int(im["id"]) for im in images], dtype=np.int64)
        sizes = np.array([(int(im["height"]), int(im["width"])) for im in images], dtype=np.int32).reshape(-1, 2)
        encoded = [str(im["file_name"]).encode() for im in images]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"annotation file {annotation_file}: an image or category lacks 'id', 'file_name', "
                        f"'height' or 'width', or has a non-integer one ({type(err).__name__}: {err})") from err
    name_offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=name_offsets[1:])
    del images
    boxes, labels, crowd, box_offsets, num_degenerate = _index_annotations(
        data.pop("annotations"), image_ids, sizes, {cat: i for i, cat in enumerate(category_ids)}, annotation_file)
    return CocoArrays(image_ids, sizes, name_offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
                      box_offsets, boxes, labels, crowd, digest, category_ids, [names[c] for c in category_ids],
                      num_degenerate, parsed=True)


def _index_annotations(annotations: list[dict[str, Any]], image_ids: np.ndarray, sizes: np.ndarray,
                       category_to_label: dict[int, int], annotation_file: Path
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Boxes of all images as flat arrays sorted by image (file order within one), with per-image offsets."""
    num_images = len(image_ids)
    if not annotations:
        return (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool),
                np.zeros(num_images + 1, np.int64), 0)
    image_index = {int(image_id): i for i, image_id in enumerate(image_ids.tolist())}
    try:
        owner = np.array([image_index[int(a["image_id"])] for a in annotations], dtype=np.int64)
        labels = np.array([category_to_label[int(a["category_id"])] for a in annotations], dtype=np.int32)
        xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64)
        if xywh.shape != (len(annotations), 4):
            raise ValueError(f"'bbox' array of shape {xywh.shape}")
    except KeyError as err:
        raise UserError(
            f"annotation file {annotation_file}: an annotation refers to unknown image/category id "
            f"or lacks a key ({err}); allowed ids are those in 'images' and 'categories'"
        ) from err
    except (TypeError, ValueError) as err:
        raise UserError(f"annotation file {annotation_file}: an annotation has a malformed 'image_id', "
                        f"'category_id' or 'bbox' (4 numbers) ({type(err).__name__}: {err})".splitlines()[0]) from err
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations])

    heights, widths = sizes[owner, 0], sizes[owner, 1]
    x1 = np.clip(xywh[:, 0], 0, widths)
    y1 = np.clip(xywh[:, 1], 0, heights)
    x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, widths)
    y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, heights)
    nonempty = (x2 > x1) & (y2 > y1)
    keep = crowd | nonempty
    num_degenerate = int((~crowd & ~nonempty).sum())

    order = np.argsort(owner[keep], kind="stable")  # stable: boxes keep their file order within an image
    boxes = np.stack([x1, y1, x2, y2], axis=1)[keep][order].astype(np.float32)
    offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[keep], minlength=num_images), out=offsets[1:])
    return boxes, labels[keep][order], crowd[keep][order], offsets, num_degenerate


# ---------------------------------------------------------------- the cache file


class CorruptCache(ValueError):
    """A cache file that cannot be used (truncated, overwritten, another version or another source)."""


def cache_path(cache_dir: Path, annotation_file: Path, digest: str) -> Path:
    """<cache_dir>/<file stem>-<digest[:20]>.v<version>.msadcoco: one file per content and format version."""
    return cache_dir / f"{annotation_file.stem}-{digest[:20]}.v{CACHE_VERSION}.msadcoco"


def write_cache(arrays: CocoArrays, path: Path, source: Path) -> None:
    """Write `arrays` to `path` atomically: a temp file in the same folder, fsync'd, renamed over the name."""
    layout, chunks, offset = {}, [], 0
    digest = hashlib.sha256()
    for name, dtype in _ARRAYS.items():
        array = getattr(arrays, name)
        layout[name] = {"dtype": dtype.str, "shape": list(array.shape), "offset": offset}
        chunks.append(_padded(np.ascontiguousarray(array, dtype=dtype).tobytes()))
        digest.update(chunks[-1])
        offset += len(chunks[-1])
    header = {"version": CACHE_VERSION, "source": str(source), "source_sha256": arrays.source_sha256,
              "data_sha256": digest.hexdigest(), "data_bytes": offset, "arrays": layout,
              "category_ids": arrays.category_ids, "category_names": arrays.category_names,
              "num_degenerate": arrays.num_degenerate}
    head = json.dumps(header).encode()

    def write(f: IO[bytes]) -> None:
        f.write(_padded(_MAGIC + len(head).to_bytes(8, "little") + head))
        for chunk in chunks:
            f.write(chunk)

    write_atomically(path, write)


def read_cache(path: Path, source_sha256: str) -> CocoArrays:
    """The arrays of a cache file, memory-mapped read-only; CorruptCache when it is unusable for `source_sha256`."""
    with path.open("rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as err:  # an empty file cannot be mapped
            raise CorruptCache(f"cannot map it ({err})") from err
    view = memoryview(mapped)
    if bytes(view[:len(_MAGIC)]) != _MAGIC or len(view) < len(_MAGIC) + 8:
        raise CorruptCache("not an msad COCO cache (bad magic)")
    head_end = len(_MAGIC) + 8 + int.from_bytes(view[len(_MAGIC):len(_MAGIC) + 8], "little")
    try:
        header = json.loads(bytes(view[len(_MAGIC) + 8:head_end]))
        start = _aligned(head_end)
        if header["version"] != CACHE_VERSION:
            raise CorruptCache(f"format version {header['version']}, this code reads {CACHE_VERSION}")
        if header["source_sha256"] != source_sha256:
            raise CorruptCache("built from another annotation file (digest differs)")
        if len(view) != start + header["data_bytes"]:
            raise CorruptCache(f"{len(view)} bytes, the header says {start + header['data_bytes']} (truncated?)")
        if hashlib.sha256(view[start:]).hexdigest() != header["data_sha256"]:
            raise CorruptCache("its arrays do not match their digest (damaged)")
        arrays = {}
        for name, dtype in _ARRAYS.items():
            spec = header["arrays"][name]
            if spec["dtype"] != dtype.str:
                raise CorruptCache(f"array {name} is {spec['dtype']}, expected {dtype.str}")
            count = int(np.prod(spec["shape"], dtype=np.int64))
            arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count,
                                         offset=start + spec["offset"]).reshape(spec["shape"])
        return CocoArrays(**arrays, source_sha256=source_sha256, category_ids=[int(c) for c in header["category_ids"]],
                          category_names=[str(n) for n in header["category_names"]],
                          num_degenerate=int(header["num_degenerate"]), parsed=False)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CorruptCache):
            raise
        raise CorruptCache(f"unreadable header ({type(err).__name__}: {err})") from err
    finally:
        view.release()


def load_annotations(annotation_file: str | Path, cache_dir: str | Path | None) -> CocoArrays:
    """The arrays of `annotation_file`: from its cache in `cache_dir` (built first, once, if missing or unusable),
    or parsed in memory when `cache_dir` is None.

    Several processes may call this at once (the workers of a node): one parses and writes the cache while the
    others wait on its lock, then every one maps the same file. A cache folder that cannot be written is warned
    about, and the file is parsed in memory, as without a cache.
    """
    annotation_file = Path(annotation_file)
    if cache_dir is None:
        return parse_annotations(annotation_file)
    if not annotation_file.is_file():
        raise UserError(f"annotation file not found: {annotation_file}")
    cache_dir = Path(cache_dir).expanduser()
    digest = file_sha256(annotation_file)
    path = cache_path(cache_dir, annotation_file, digest)
    arrays = _try_read(path, digest, warn=True)
    if arrays is not None:
        return arrays
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock").open("a+b")
    except OSError as err:
        warnings.warn(f"cannot write annotation caches in {cache_dir} ({err}); parsing {annotation_file} in memory "
                      "(set MSAD_CACHE to a writable folder)", stacklevel=2)
        return parse_annotations(annotation_file)
    with lock:  # flock is released when the file closes, also when the process dies
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        arrays = _try_read(path, digest, warn=False)  # written by another process while this one waited
        if arrays is not None:
            return arrays
        parsed = parse_annotations(annotation_file)
        if parsed.source_sha256 != digest:  # the file changed since it was hashed: its next reader caches it
            return parsed
        try:
            write_cache(parsed, path, annotation_file)
        except OSError as err:
            warnings.warn(f"cannot write annotation cache {path} ({err}); using {annotation_file} parsed in memory",
                          stacklevel=2)
            return parsed
    del parsed  # the mapped copy replaces it, so the parsed arrays' memory goes back
    return dataclasses.replace(read_cache(path, digest), parsed=True)


def _try_read(path: Path, source_sha256: str, warn: bool) -> CocoArrays | None:
    """The cache at `path`, or None when there is none or it is unusable (then warned about if `warn`)."""
    if not path.exists():
        return None
    try:
        return read_cache(path, source_sha256)
    except (CorruptCache, OSError) as err:
        if warn:
            warnings.warn(f"annotation cache {path} is unusable: {err}; rebuilding it", stacklevel=3)
        return None


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _padded(data: bytes) -> bytes:
    return data + bytes(_aligned(len(data)) - len(data))
