"""Bootstrap intervals and paired differences of COCO AP, checked against pycocotools itself.

The reference for a resample is independent of our accumulation: a COCO dataset that literally holds k copies of
each image drawn k times (new image ids, copied annotations and detections), scored by pycocotools' COCOeval.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msad.engine.bootstrap import (
    Replicates,
    bias_corrected_interval,
    bootstrap,
    paired_difference,
    resample_weights,
    seed_averaged_difference,
    seed_t_interval,
    t_cdf,
    t_quantile,
    weighted_accumulate,
)
from msad.engine.evaluate import coco_evaluate

N_IMAGES = 30


def _scene(seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth with 3 classes and boxes of all sizes; detections jittered from it plus false positives, some
    with tied scores (rounded to 0.1), so ties across images are exercised."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, N_IMAGES + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 200, "width": 300})
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(5, 80, 2)
            x, y = rng.uniform(0, 200), rng.uniform(0, 120)
            category = int(rng.integers(1, 4))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.7:
                jitter = rng.normal(0, 0.15 * min(w, h), 4)
                detections.append({"image_id": image_id, "category_id": category, "score": float(rng.random()),
                                   "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]})
        for _ in range(rng.integers(0, 4)):
            w, h = rng.uniform(5, 80, 2)
            detections.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)),
                                "bbox": [rng.uniform(0, 200), rng.uniform(0, 120), w, h],
                                "score": float(np.round(rng.random(), 1))})
    categories = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _evaluated(dataset: dict, detections: list[dict]) -> COCOeval:
    gt = _coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _with_copies(dataset: dict, detections: list[dict], counts: np.ndarray) -> tuple[dict, list[dict]]:
    """The dataset with image i present counts[i] times (fresh ids), its annotations and detections copied."""
    images, annotations, copied = [], [], []
    for image, count in zip(dataset["images"], counts, strict=True):
        for _ in range(int(count)):
            new_id = len(images) + 1
            images.append({**image, "id": new_id})
            annotations += [{**a, "id": len(annotations) + 1 + k, "image_id": new_id}
                            for k, a in enumerate(a for a in dataset["annotations"] if a["image_id"] == image["id"])]
            copied += [{**d, "image_id": new_id} for d in detections if d["image_id"] == image["id"]]
    annotations = [{**a, "id": i + 1} for i, a in enumerate(annotations)]
    return {**dataset, "images": images, "annotations": annotations}, copied


@pytest.fixture(scope="module")
def scene() -> tuple[dict, list[dict], COCOeval]:
    dataset, detections = _scene()
    return dataset, detections, _evaluated(dataset, detections)


def test_unit_weights_give_cocoevals_own_numbers(scene: tuple[dict, list[dict], COCOeval]) -> None:
    _, _, evaluator = scene
    values = weighted_accumulate(evaluator, np.ones((1, N_IMAGES)))
    stats = evaluator.stats
    assert 0.05 < stats[0] < 0.5  # a scene with something to measure
    assert values["AP"][0] == pytest.approx(stats[0], abs=1e-12)
    assert values["AP50"][0] == pytest.approx(stats[1], abs=1e-12)
    assert values["APs"][0] == pytest.approx(stats[3], abs=1e-12)


def test_a_resample_equals_cocoeval_on_a_dataset_holding_the_copies(scene: tuple[dict, list[dict], COCOeval]) -> None:
    dataset, detections, evaluator = scene
    weights = resample_weights(N_IMAGES, 3, seed=7)
    values = weighted_accumulate(evaluator, weights)
    for row, counts in enumerate(weights):
        assert (counts == 0).any() and (counts > 1).any()  # a real resample: some images left out, some repeated
        reference = _evaluated(*_with_copies(dataset, detections, counts)).stats
        assert values["AP"][row] == pytest.approx(reference[0], abs=1e-12)
        assert values["AP50"][row] == pytest.approx(reference[1], abs=1e-12)
        assert values["APs"][row] == pytest.approx(reference[3], abs=1e-12)


def test_crowd_regions_ignore_a_few_detections_and_resamples_still_equal_cocoeval() -> None:
    """Crowd boxes (iscrowd 1) make COCOeval ignore the detections that land on them: in the "all" area a few
    detections are ignored (not none, not most), the case where the accumulation subtracts the ignored ones from a
    running total instead of summing the counted ones."""
    dataset, detections = _scene(seed=3)
    crowds = dataset["annotations"][::5]
    for annotation in crowds:
        annotation["iscrowd"] = 1
    detections += [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.55}
                   for a in crowds]
    evaluator = _evaluated(dataset, detections)
    all_area = evaluator.params.areaRngLbl.index("all")
    ignored = [np.asarray(e["dtIgnore"][0], dtype=bool) for e in evaluator.evalImgs
               if e is not None and e["aRng"] == evaluator.params.areaRng[all_area]]
    share = np.concatenate(ignored).mean()
    assert 0.02 < share < 0.5
    weights = resample_weights(N_IMAGES, 2, seed=11)
    values = weighted_accumulate(evaluator, np.vstack([np.ones(N_IMAGES), weights]))
    for row, counts in enumerate([np.ones(N_IMAGES, dtype=int), *weights]):
        reference = _evaluated(*_with_copies(dataset, detections, counts)).stats
        assert values["AP"][row] == pytest.approx(reference[0], abs=1e-12)
        assert values["AP50"][row] == pytest.approx(reference[1], abs=1e-12)
        assert values["APs"][row] == pytest.approx(reference[3], abs=1e-12)


def test_intervals_are_deterministic_and_contain_the_point_estimate(scene: tuple[dict, list[dict], COCOeval]) -> None:
    _, _, evaluator = scene
    first, second = bootstrap(evaluator, 300), bootstrap(evaluator, 300)
    assert first == second and first.samples == 300 and first.num_images == N_IMAGES
    for metric, index in (("AP", 0), ("AP50", 1), ("APs", 3)):
        low, high = first.interval(metric)
        assert low < evaluator.stats[index] < high
        assert high - low > 0.01  # 30 images: AP is far from exact
    assert Replicates.from_dict(json.loads(first.to_json())) == first  # survives the JSON row


def test_identical_models_differ_by_exactly_zero(scene: tuple[dict, list[dict], COCOeval]) -> None:
    _, _, evaluator = scene
    replicates = bootstrap(evaluator, 200)
    difference = paired_difference(replicates, replicates, "AP")
    assert (difference.point, difference.low, difference.high, difference.real) == (0.0, 0.0, 0.0, False)


def test_a_model_better_on_every_image_is_really_better(scene: tuple[dict, list[dict], COCOeval]) -> None:
    """A finds every object (exact boxes, score 0.9) among the scene's false positives; B is A missing one object in
    every image that has one: on every resample A's recall is higher at the same precision."""
    dataset, _, _ = scene
    false_positives = [{"image_id": i, "category_id": 1, "bbox": [250.0, 150.0, 20.0, 20.0], "score": 0.5}
                       for i in range(1, N_IMAGES + 1)]
    hits = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in dataset["annotations"]]
    first_hit = {d["image_id"]: i for i, d in reversed(list(enumerate(hits)))}
    better = _evaluated(dataset, hits + false_positives)
    worse = _evaluated(dataset, [d for i, d in enumerate(hits) if i not in first_hit.values()] + false_positives)
    a, b = bootstrap(better, 200), bootstrap(worse, 200)
    difference = paired_difference(a, b, "AP")
    assert difference.point == pytest.approx(better.stats[0] - worse.stats[0], abs=1e-12)
    assert difference.point > 0 and difference.low > 0 and difference.real
    # unpaired (other images) replicates are refused rather than compared
    other = Replicates(a.seed, "another-set", a.num_images, a.values, a.point)
    assert paired_difference(a, other, "AP") is None


def test_seed_averaged_difference_widens_with_seed_noise(scene: tuple[dict, list[dict], COCOeval]) -> None:
    _, _, evaluator = scene
    a = bootstrap(evaluator, 400)

    def shifted(delta: float) -> Replicates:
        return Replicates(a.seed, a.images, a.num_images, {k: [v + delta for v in vs] for k, vs in a.values.items()},
                          {k: v + delta for k, v in a.point.items()})

    steady = seed_averaged_difference([(shifted(0.02), a), (shifted(0.02), a)], "AP")
    assert steady.point == pytest.approx(0.02) and steady.low == pytest.approx(0.02) and steady.real
    noisy = seed_averaged_difference([(shifted(0.10), a), (shifted(-0.06), a)], "AP")
    assert noisy.point == pytest.approx(0.02) and noisy.low < 0 < noisy.high and not noisy.real


def test_t_quantiles_match_the_tables_and_are_not_the_normal_ones() -> None:
    """Student's t (no scipy): the 97.5 % quantiles of a t table, a fractional df between its neighbours, the
    normal limit; negative control: the normal 1.96 leaves 8 % (not 2.5 %) above it at 2 df."""
    for df, table in ((1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (10, 2.2281389),
                      (30, 2.0422725)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-6)
        assert t_cdf(table, df) == pytest.approx(0.975, abs=1e-7)
    assert t_quantile(0.025, 3) == pytest.approx(-3.1824463, abs=1e-6)
    assert 3.1824463 < t_quantile(0.975, 2.5) < 4.3026527
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    assert 1 - t_cdf(1.959964, 2) == pytest.approx(0.0943, abs=1e-3)


def test_seed_t_interval_adds_the_image_noise_seeds_share_to_a_t_interval_over_them() -> None:
    """The fidelity run's KD differences (+0.8, +0.1, +1.1 AP): without image noise common to the seeds the
    interval is the t-interval over the three values, which holds zero; noise of each seed alone is already in
    their spread and adds nothing. Noise all seeds share adds its normal half-width in quadrature."""
    per_seed = np.array([0.008, 0.001, 0.011])
    rng = np.random.default_rng(0)
    own = rng.normal(0, 0.0023, (3, 500))  # each seed's own image noise: independent across seeds
    low, high = seed_t_interval(per_seed, per_seed[:, None] + own)
    half = 4.3026527 * per_seed.std(ddof=1) / np.sqrt(3)
    assert (low, high) == pytest.approx((per_seed.mean() - half, per_seed.mean() + half), abs=2e-4)
    assert (round(100 * low, 1), round(100 * high, 1)) == (-0.6, 1.9)  # RESULTS.md: [-0.6, 2.0], unrounded seeds
    common = rng.normal(0, 0.003, 500)  # all three seeds' replicates move together
    wider = seed_t_interval(per_seed, per_seed[:, None] + common[None, :])
    expected = np.hypot(half, 1.959964 * common.std(ddof=1))
    assert wider == pytest.approx((per_seed.mean() - expected, per_seed.mean() + expected), rel=1e-6)
    assert wider[1] - wider[0] > high - low
    # seeds that agree exactly: only the shared image noise is left, a normal interval on it
    same = seed_t_interval(np.full(3, 0.007), 0.007 + np.tile(common, (3, 1)))
    assert same == pytest.approx((0.007 - 1.959964 * common.std(ddof=1), 0.007 + 1.959964 * common.std(ddof=1)))
    assert seed_t_interval(per_seed[:1], own[:1]) is None  # one seed has no spread to go on
    # through seed_averaged_difference, the report's path: the same interval, each seed's value kept; negative
    # control, the old two-level bootstrap on the same replicates calls +0.7 real, as it did on the fidelity run
    zero = Replicates(0, "val", 128, {"AP": [0.0] * 500}, {"AP": 0.0})
    pairs = [(Replicates(0, "val", 128, {"AP": list(p + o)}, {"AP": float(p)}), zero)
             for p, o in zip(per_seed, own, strict=True)]
    report = seed_averaged_difference(pairs, "AP")
    assert (report.low, report.high) == pytest.approx((low, high), rel=1e-12)
    assert report.method == "t" and report.per_seed == tuple(per_seed) and report.seeds == 3 and not report.real
    old = seed_averaged_difference(pairs, "AP", method="two-level")
    assert old.method == "two-level" and old.point == pytest.approx(0.00667, abs=1e-5) and old.real
    assert 0 < old.low < 0.003 and old.high - old.low < 0.5 * (high - low)  # half as wide


def test_coco_evaluate_reports_intervals_and_writes_replicates(scene: tuple[dict, list[dict], COCOeval],
                                                               tmp_path: Path) -> None:
    dataset, detections, evaluator = scene
    metrics = coco_evaluate(_coco(dataset), detections, bootstrap_samples=100, bootstrap_json=tmp_path / "b.json")
    assert metrics["AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert metrics["AP_lo"] < metrics["AP"] < metrics["AP_hi"]
    assert metrics["APs_lo"] < metrics["APs"] < metrics["APs_hi"]
    saved = Replicates.from_dict(json.loads((tmp_path / "b.json").read_text()))
    assert saved.samples == 100 and saved.interval("AP") == (metrics["AP_lo"], metrics["AP_hi"])
    assert "AP_lo" not in coco_evaluate(_coco(dataset), detections)  # off by default in the function


def test_bias_correction_recentres_replicates_that_sit_above_the_point() -> None:
    """Resampled APs run above the full set's AP (interpolated precision is a running maximum): with replicates
    centred half an SD above the point, plain percentiles would leave the point near the lower end; BC moves the
    interval down by the bias, as for a normal statistic: centre = point - bias, half-width = 1.96 SD."""
    point, bias, sd = 0.30, 0.005, 0.01
    values = point + bias + sd * np.random.default_rng(0).standard_normal(200_000)
    low, high = bias_corrected_interval(values, point)
    assert (low + high) / 2 == pytest.approx(point - bias, abs=2e-4)
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.01)
    centred = point + sd * np.random.default_rng(1).standard_normal(200_000)  # no bias: the percentile interval
    assert bias_corrected_interval(centred, point) == pytest.approx(tuple(np.percentile(centred, [2.5, 97.5])),
                                                                    abs=2e-4)


def test_real_ap_replicates_sit_above_the_point_and_the_interval_still_holds_it(
        scene: tuple[dict, list[dict], COCOeval]) -> None:
    _, _, evaluator = scene
    replicates = bootstrap(evaluator, 500)
    values = np.asarray(replicates.values["AP"])
    assert values.mean() > replicates.point["AP"]  # the upward bias that BC corrects
    low, high = replicates.interval("AP")
    assert low < replicates.point["AP"] < high
