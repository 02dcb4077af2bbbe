"""The annotation cache (msad.data.coco_cache) and the evaluator: cached = parsed, rebuilt when it must be, one cache
from racing builders, and faster-coco-eval's metrics = pycocotools'."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_coco_eval import COCOeval_faster
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msad.data.coco import CocoDetection
from msad.data.coco_cache import CACHE_VERSION, load_annotations
from msad.data.shapes import ShapesSpec, ensure_shapes_dataset
from msad.engine.evaluate import METRIC_NAMES, coco_evaluate
from msad.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHAPES = ShapesSpec(num_train=6, num_val=4, image_size=(96, 128), object_size=(6, 48), seed=5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), SHAPES)


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path]:
    """Crowd, degenerate, clipped and unordered boxes, an image without any and unicode file names."""
    for name in ("a.png", "b.png", "ü.png"):
        Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / name)
    images = [{"id": i, "file_name": n, "height": 40, "width": 60} for i, n in ((11, "a.png"), (12, "b.png"),
                                                                                (13, "ü.png"))]
    anns = [
        {"id": 1, "image_id": 13, "category_id": 3, "bbox": [50, 30, 20, 20], "iscrowd": 0},  # clipped
        {"id": 2, "image_id": 11, "category_id": 90, "bbox": [30, 5, 10, 20], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        {"id": 4, "image_id": 13, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # degenerate
        {"id": 5, "image_id": 11, "category_id": 3, "bbox": [1.25, 2.5, 3, 4], "iscrowd": 0},
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return tmp_path, annotation_file


def _assert_same_dataset(a: CocoDetection, b: CocoDetection) -> None:
    assert (a.image_ids, a.image_sizes(), a.landscape()) == (b.image_ids, b.image_sizes(), b.landscape())
    assert (a.contiguous_to_category_id, a.category_names, a.num_degenerate_boxes) == (
        b.contiguous_to_category_id, b.category_names, b.num_degenerate_boxes)
    for index in range(len(a)):
        (image_a, target_a), (image_b, target_b) = a[index], b[index]
        assert torch.equal(image_a, image_b) and target_a["image_id"] == target_b["image_id"]
        for key in ("boxes", "labels"):
            assert target_a[key].dtype == target_b[key].dtype and torch.equal(target_a[key], target_b[key])


@pytest.mark.filterwarnings("ignore:.*degenerate")
def test_cached_and_uncached_datasets_give_identical_samples(shapes, mixed, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cases = [(shapes.train_images, shapes.train_annotations), (shapes.val_images, shapes.val_annotations), mixed]
    for image_dir, annotation_file in cases:
        for drop in (False, True):
            parsed = CocoDetection(image_dir, annotation_file, drop_images_without_boxes=drop)
            built = CocoDetection(image_dir, annotation_file, drop_images_without_boxes=drop, cache_dir=cache)
            mapped = CocoDetection(image_dir, annotation_file, drop_images_without_boxes=drop, cache_dir=cache)
            assert parsed._arrays.parsed and not mapped._arrays.parsed
            assert not mapped._arrays.boxes.flags.writeable  # read from the mapped file, not a copy
            _assert_same_dataset(parsed, built)
            _assert_same_dataset(parsed, mapped)
            assert mapped._coco is None  # no pycocotools index unless evaluation asks for one
    assert len(list(cache.glob(f"*.v{CACHE_VERSION}.msadcoco"))) == 3
    image_dir, annotation_file = mixed
    dataset = CocoDetection(image_dir, annotation_file, cache_dir=cache, drop_images_without_boxes=True)
    assert dataset.image_ids == [11, 13] and dataset[1][1]["boxes"].tolist() == [[50, 30, 60, 40]]
    assert dataset[0][1]["boxes"].tolist() == [[30, 5, 40, 25], [1.25, 2.5, 4.25, 6.5]]  # crowd box left out
    assert len(dataset.coco.getAnnIds()) == 5  # the index, when asked for, is the whole file as written


def test_changed_or_broken_annotation_file_is_never_served_from_the_cache(mixed, tmp_path: Path) -> None:
    image_dir, annotation_file = mixed
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="degenerate"):
        before = CocoDetection(image_dir, annotation_file, cache_dir=cache)
    data = json.loads(annotation_file.read_text())
    data["annotations"].append({"id": 6, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    annotation_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="degenerate"):
        after = CocoDetection(image_dir, annotation_file, cache_dir=cache)
    assert after._arrays.parsed and before[1][1]["boxes"].shape == (0, 4)
    assert after[1][1]["boxes"].tolist() == [[1, 1, 6, 6]]
    assert len(list(cache.glob("*.msadcoco"))) == 2
    with pytest.raises(UserError, match="changed since this dataset read it"):
        before.coco  # noqa: B018 (the property is what is tested)

    text = annotation_file.read_text()
    bad_box = text.replace('"bbox": [1, 1, 5, 5]', '"bbox": [1, 5, 5]')
    for broken, message in ((text[: len(text) // 2], "is not valid JSON"), ('{"images": []}', "lacks the COCO list"),
                            (bad_box, "malformed .*'bbox' \\(4 numbers\\)")):
        annotation_file.write_text(broken)
        with pytest.raises(UserError, match=message) as error:
            CocoDetection(image_dir, annotation_file, cache_dir=cache)
        assert str(annotation_file) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="annotation file not found"):
        CocoDetection(image_dir, tmp_path / "nope.json", cache_dir=cache)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty", "garbage", "other_version"])
def test_corrupt_cache_is_rebuilt_with_a_warning(shapes, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    first = load_annotations(shapes.val_annotations, cache)
    expected = {name: np.array(getattr(first, name)) for name in ("image_ids", "sizes", "names", "boxes", "crowd")}
    del first  # a mapped file changed in place under a reader is undefined (SIGBUS when cut): damage a new inode
    (path,) = cache.glob("*.msadcoco")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip_byte":
        raw[-200] ^= 0xFF
    elif damage == "empty":
        raw = bytearray()
    elif damage == "garbage":
        raw = bytearray(b"\x00" * 4096)
    else:
        raw = raw.replace(f'"version": {CACHE_VERSION}'.encode(), f'"version": {CACHE_VERSION + 1}'.encode(), 1)
    damaged = path.with_name("damaged")
    damaged.write_bytes(bytes(raw))
    damaged.replace(path)
    with pytest.warns(UserWarning, match=f"annotation cache {path} is unusable: .*; rebuilding it"):
        rebuilt = load_annotations(shapes.val_annotations, cache)
    assert rebuilt.parsed and path.read_bytes() != bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is used as it is
        again = load_annotations(shapes.val_annotations, cache)
    assert not again.parsed
    for name, array in expected.items():
        assert np.array_equal(array, getattr(again, name))


def test_unwritable_cache_folder_falls_back_to_parsing(shapes, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write annotation caches in"):
        arrays = load_annotations(shapes.val_annotations, blocker / "cache")
    assert arrays.parsed and len(arrays.image_ids) == SHAPES.num_val


# A builder process: load_annotations on the file, with two test-only hooks that make the race happen every time
# instead of when the scheduler happens to allow it (both wrap the real function; the cache code runs as it is):
# - fcntl.flock first tries the lock without blocking; a builder that finds it taken writes `blocked.<pid>` and
#   then waits on it as load_annotations does (in "nolock" mode, the negative control, the lock is a no-op);
# - parse_annotations, the slow step under the lock, writes `parsing.<pid>` and holds until the other builder is
#   inside the same window too: blocked on the lock (with the lock) or parsing as well (without it).
# The two start together (`ready.<pid>`). Each prints whether it parsed and when (time.monotonic, one clock for
# all processes on Linux) it reached each point.
BUILDER = """
import fcntl, json, os, sys, time
from pathlib import Path
from msad.data import coco_cache

annotation_file, cache, rendezvous, mode = sys.argv[1:5]
here, me = Path(rendezvous), str(os.getpid())
real_flock, real_parse = fcntl.flock, coco_cache.parse_annotations
events = {}

def mark(what):
    events[what] = time.monotonic()
    (here / f"{what}.{me}").touch()

def wait_for_other(*whats):
    deadline = time.monotonic() + 60
    while not any(p.name.split(".")[0] in whats and p.name.split(".")[1] != me for p in here.iterdir()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other builder never reached {whats}")
        time.sleep(0.002)

def flock(fd, operation):
    lock = real_flock if mode == "lock" else (lambda fd, operation: None)
    try:
        lock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        mark("blocked")
        lock(fd, operation)
    mark("locked")

def parse_annotations(path):
    mark("parsing")
    wait_for_other("blocked", "parsing")
    try:
        return real_parse(path)
    finally:
        mark("parsed")

fcntl.flock, coco_cache.parse_annotations = flock, parse_annotations
mark("ready")
wait_for_other("ready")
arrays = coco_cache.load_annotations(annotation_file, cache)
mark("done")
print(json.dumps({"parsed": arrays.parsed, "boxes": int(len(arrays.boxes)), "sum": float(arrays.boxes.sum()),
                  "events": events}))
"""


def _race(tmp_path: Path, mode: str) -> tuple[Path, Path, list[dict]]:
    """Two builders of one annotation file (2,000 images, 20,000 boxes) into an empty cache, racing."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(1, 2001)]
    anns = [{"id": k, "image_id": int(rng.integers(1, 2001)), "category_id": int(rng.integers(1, 81)),
             "bbox": [float(v) for v in rng.uniform(0, 300, 4)], "iscrowd": 0} for k in range(1, 20001)]
    annotation_file = tmp_path / "big.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": anns,
                                           "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}))
    cache, rendezvous = tmp_path / "cache", tmp_path / "rendezvous"
    rendezvous.mkdir()
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, str(annotation_file), str(cache), str(rendezvous),
                                  mode], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    reports = []
    for builder in builders:
        out, err = builder.communicate(timeout=120)
        assert builder.returncode == 0, err
        reports.append(json.loads(out))
    return annotation_file, cache, reports


def test_concurrent_builders_leave_one_valid_cache(tmp_path: Path) -> None:
    """Two processes in load_annotations at once, held so that their builds overlap (see BUILDER): one parses and
    writes the cache while the other is blocked on the lock, then maps what the first wrote."""
    annotation_file, cache, reports = _race(tmp_path, "lock")
    parser, waiter = sorted(reports, key=lambda r: not r["parsed"])
    assert (parser["parsed"], waiter["parsed"]) == (True, False)  # one parsed, the other mapped its file
    assert "parsing" not in waiter["events"]
    # the overlap happened: the waiter found the lock taken before the parse ended, and got it only after
    assert waiter["events"]["blocked"] < parser["events"]["parsed"] < waiter["events"]["locked"]
    assert parser["boxes"] == waiter["boxes"] == 20000 and parser["sum"] == waiter["sum"]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith(".") and files[0].endswith(".lock")  # the lock file and the cache
    assert not load_annotations(annotation_file, cache).parsed


def test_without_the_lock_both_concurrent_builders_parse(tmp_path: Path) -> None:
    """The negative control of the test above: the same race with the lock made a no-op (test-only hook in
    BUILDER). Both builders find no cache, both parse the whole file at the same time (the memory and time the lock
    exists to save: 3.4 GB and 14 s per process for COCO train), so the assertion above fails."""
    annotation_file, cache, reports = _race(tmp_path, "nolock")
    assert [r["parsed"] for r in reports] == [True, True]
    assert all("blocked" not in r["events"] for r in reports)
    starts = [r["events"]["parsing"] for r in reports]
    ends = [r["events"]["parsed"] for r in reports]
    assert max(starts) < min(ends)  # the two parses overlapped in time
    assert reports[0]["sum"] == reports[1]["sum"]  # the rename keeps the cache itself whole
    assert not load_annotations(annotation_file, cache).parsed


# ---------------------------------------------------------------- evaluation: faster-coco-eval = pycocotools


def _detections(coco: COCO, per_image: int, seed: int) -> list[dict]:
    """Jittered copies of the ground truth plus random boxes, `per_image` per image, random scores."""
    rng = np.random.default_rng(seed)
    categories = coco.getCatIds()
    results = []
    for image_id in coco.getImgIds():
        image = coco.imgs[image_id]
        truth = [a for a in coco.imgToAnns[image_id]][:per_image]
        for a in truth:
            x, y, w, h = a["bbox"]
            results.append({"image_id": image_id, "category_id": a["category_id"], "score": float(rng.random()),
                            "bbox": [x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h), w, h]})
        for _ in range(per_image - len(truth)):
            w, h = rng.uniform(2, image["width"] / 2), rng.uniform(2, image["height"] / 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(categories)),
                            "score": float(rng.random()), "bbox": [float(rng.uniform(0, image["width"] - w)),
                                                                   float(rng.uniform(0, image["height"] - h)), w, h]})
    return results


def _coco_shaped(images: int, seed: int) -> COCO:
    """COCO's shape: 80 classes, about 7 boxes per image of every size, 640x480 images."""
    rng = np.random.default_rng(seed)
    anns = []
    for image_id in range(1, images + 1):
        for _ in range(rng.poisson(7)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(400), 2))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                         "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), w, h],
                         "area": float(w * h), "iscrowd": int(rng.random() < 0.01)})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": 480, "width": 640, "file_name": f"{i}.jpg"}
                               for i in range(1, images + 1)],
                    "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _stats(evaluator_type: type, gt: COCO, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = evaluator_type(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:12], dtype=np.float64)


def test_faster_coco_eval_gives_pycocotools_metrics(shapes, tmp_path: Path) -> None:
    """The 12 COCO numbers on the built-in dataset and on a COCO-shaped case (80 classes, 100 detections per
    image); the full 5,000-image case is benchmarks/data_scale.py's. They may differ in the last bit (C++ sums in
    another order): measured 7e-18 at most."""
    val = CocoDetection(shapes.val_images, shapes.val_annotations, cache_dir=tmp_path)
    for gt, per_image in ((val.coco, 20), (_coco_shaped(30, 1), 100)):
        results = _detections(gt, per_image, seed=2)
        reference = _stats(COCOeval, gt, results)
        assert reference[0] > 0.05  # a case where matching matters, not all zeros
        np.testing.assert_allclose(_stats(COCOeval_faster, gt, results), reference, rtol=0, atol=1e-12)
        metrics = coco_evaluate(gt, results)  # what training reports (no bootstrap: faster-coco-eval)
        np.testing.assert_allclose([metrics[n] for n in METRIC_NAMES],
                                   np.where(reference[:6] < 0, np.nan, reference[:6]), rtol=0, atol=1e-12)
        if gt is val.coco:
            bootstrapped = coco_evaluate(gt, results, bootstrap_samples=5)  # pycocotools, for its evalImgs
            assert [bootstrapped[n] for n in METRIC_NAMES] == pytest.approx([metrics[n] for n in METRIC_NAMES],
                                                                            abs=1e-12, nan_ok=True)
