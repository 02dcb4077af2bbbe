"""How much of an AP is noise: bootstrap intervals over validation images, and paired differences of two models.

An AP on 64 (or 5,000) validation images is one draw: another set of images from the same distribution gives
another AP. The bootstrap estimates that spread by resampling the images with replacement and scoring each
resample. pycocotools' `COCOeval.evaluate` (the expensive part: matching detections to ground truth) depends only
on each image, so it runs once; each resample repeats only the accumulation, where an image drawn k times counts
k times (`weighted_accumulate`, which gives exactly what COCOeval gives on a dataset holding k copies of it).

Every model evaluated on the same image ids gets the same resamples (they depend only on the seed and the sorted
ids), so two models' replicates are paired: their difference per resample is the bootstrap of the difference,
and image-level noise that both share cancels (Efron & Tibshirani 1993, ch. 13; Bouthillier et al. 2021,
"Accounting for variance in machine learning benchmarks", for combining it with seeds).

Intervals are bias-corrected percentile intervals (BC; Efron 1987), not plain percentiles: resampled APs sit
above the full set's AP (measured: by about half a standard deviation, 0.5 AP on 128 images), because AP's
interpolated precision is a running maximum, which noise can only raise. Plain percentiles would then put the
point estimate near the interval's lower end; BC shifts the percentiles by how far the point estimate sits from
the replicates' median.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

# The metrics given intervals: AP over IoU 0.5:0.95, AP at IoU 0.5 (both over all areas), and small-object AP.
BOOTSTRAP_METRICS = ("AP", "AP50", "APs")
SEED = 0  # one seed for every evaluation, so that models scored on the same images share their resamples
LEVEL = 0.95
_MAX_DETECTIONS = 100  # COCO's last maxDets: the one AP, AP50 and APs use
_CHUNK_ELEMENTS = 4_000_000  # resamples x detections held at once (about 32 MB of float64 per array)


@dataclass(frozen=True)
class _Matches:
    """One category at one area range: every image's detections (top 100) in COCOeval's order, matched once."""

    image_index: np.ndarray  # [D] which image (position in the sorted ids) each detection comes from
    true_positive: np.ndarray  # [T, D] bool, per IoU threshold: matched and not ignored
    false_positive: np.ndarray  # [T, D] bool: unmatched and not ignored
    positives: np.ndarray  # [I] ground truths that count (not ignored) per image


def _matches(evaluator: COCOeval, category: int, area: int) -> _Matches | None:
    """Per-image matching of `evaluator.evaluate()` for one category and area range, concatenated in image order
    and sorted by score as `COCOeval.accumulate` does (stable mergesort of -score). None: no image has either."""
    params = evaluator.params
    n_images, n_areas = len(params.imgIds), len(params.areaRng)
    thresholds = len(params.iouThrs)
    offset = category * n_areas * n_images + area * n_images
    entries = [(i, e) for i in range(n_images) if (e := evaluator.evalImgs[offset + i]) is not None]
    if not entries:
        return None
    positives = np.zeros(n_images, dtype=np.int64)
    scores, images, matched, ignored = [], [], [], []
    for i, e in entries:
        positives[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        kept = np.asarray(e["dtScores"][:_MAX_DETECTIONS], dtype=np.float64)
        scores.append(kept)
        images.append(np.full(len(kept), i, dtype=np.int64))
        matched.append(np.asarray(e["dtMatches"])[:, : len(kept)].reshape(thresholds, len(kept)))
        ignored.append(np.asarray(e["dtIgnore"])[:, : len(kept)].reshape(thresholds, len(kept)))
    order = np.argsort(-np.concatenate(scores), kind="mergesort")
    dtm = np.concatenate(matched, axis=1)[:, order] != 0
    dtig = np.concatenate(ignored, axis=1)[:, order] != 0
    return _Matches(np.concatenate(images)[order], dtm & ~dtig, ~dtm & ~dtig, positives)


def _weighted_count_through(weights: np.ndarray, running_total: np.ndarray, counted: np.ndarray,
                            at: np.ndarray) -> np.ndarray:
    """[b, len(at)]: the weighted number of `counted` detections at or before each column in `at` (sorted).

    Args:
        weights: [b, D] each detection's weight (its image's count in the resample).
        running_total: [b, D] the cumulative sum of `weights` over all D detections.
        counted: [D] bool, the detections to count.
        at: sorted column indices.

    Cumulates over whichever of the counted or the not-counted columns is fewer (COCO's "all" area ignores almost
    nothing, its "small" area almost everything), so its cost follows the smaller set, not D.
    """
    if counted.all():
        return running_total[:, at]
    count_those = np.count_nonzero(counted) <= counted.size // 2
    columns = np.flatnonzero(counted if count_those else ~counted)
    through = np.zeros((len(weights), len(columns) + 1))
    np.cumsum(weights[:, columns], axis=1, out=through[:, 1:])
    before = through[:, np.searchsorted(columns, at, side="right")]
    return before if count_those else running_total[:, at] - before


def _interpolated_precision(tp: np.ndarray, counted: np.ndarray, positives: np.ndarray,
                            recalls: np.ndarray) -> np.ndarray:
    """COCOeval.accumulate's interpolated precision at one IoU threshold, for many weightings at once, from the
    true-positive detections alone.

    COCOeval computes recall and precision at every detection; between two true positives recall stays and
    precision only falls, so the best precision at a recall or beyond is always reached at a true positive (or is
    0 before the first), and the first detection to reach a recall threshold is a true positive. The same numbers
    (the same float operations on the same integer counts) therefore come from the true positives' columns only.

    Args:
        tp: [b, P] weighted cumulative true positives at each true positive, in score order.
        counted: [b, P] weighted cumulative detections that count (true or false positives) at the same columns.
        positives: [b] weighted count of ground truths that count (> 0).
        recalls: [R] the recall thresholds (COCO: 0, 0.01, ..., 1).

    Returns:
        [b, R]: at each recall threshold, the best precision at that recall or beyond; 0 where never reached.
    """
    batch, columns = tp.shape
    if columns == 0:
        return np.zeros((batch, len(recalls)))
    recall = tp / positives[:, None]
    fp = counted - tp
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.flip(np.maximum.accumulate(np.flip(precision, axis=-1), axis=-1), axis=-1)
    # COCOeval: np.searchsorted(recall_row, recalls, side="left"), the number of columns whose recall is below each
    # threshold (recall never decreases along a row). The same count for every row at once, with the same
    # comparisons: each column passes the thresholds <= its recall, and the columns below threshold j are those
    # that passed at most j of them.
    passed = np.searchsorted(recalls, recall, side="right")
    bins = len(recalls) + 1
    per_row = np.bincount((passed + bins * np.arange(batch)[:, None]).ravel(), minlength=batch * bins)
    first = np.cumsum(per_row.reshape(batch, bins)[:, :-1], axis=1)  # [b, R]
    at_first = np.take_along_axis(precision, np.minimum(first, columns - 1), axis=-1)
    return np.where(first < columns, at_first, 0.0)


def weighted_accumulate(evaluator: COCOeval, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AP50 and APs for each row of image weights, from an evaluator whose `evaluate()` has run.

    Args:
        evaluator: a COCOeval (iouType "bbox") after `evaluate()`; `params.imgIds` are the images weighted.
        weights: [B, I] non-negative integer weight per resample and image (in `params.imgIds` order): how many
            times the image is in that resample. All ones gives COCOeval's own AP, AP50 and APs.

    Returns:
        metric -> [B] values in [0, 1]; NaN where no ground truth counts (pycocotools' -1).
    """
    params = evaluator.params
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(params.imgIds):
        raise ValueError(f"weights must be [resamples, {len(params.imgIds)}], got {weights.shape}")
    recalls = np.asarray(params.recThrs)
    areas = {"all": params.areaRngLbl.index("all"), "small": params.areaRngLbl.index("small")}
    # per metric: [B] sums of precision over (thresholds x recalls x categories present), and the number of them
    totals = {name: np.zeros(len(weights)) for name in BOOTSTRAP_METRICS}
    counts = {name: np.zeros(len(weights)) for name in BOOTSTRAP_METRICS}
    for category in range(len(params.catIds)):
        for area_name, area in areas.items():
            matches = _matches(evaluator, category, area)
            if matches is None:
                continue
            positives = weights @ matches.positives
            present = positives > 0
            thresholds, detections = matches.true_positive.shape
            counted = matches.true_positive | matches.false_positive
            hits = [np.flatnonzero(row) for row in matches.true_positive]  # per threshold: its true positives
            chunk = max(1, _CHUNK_ELEMENTS // max(1, detections))
            for start in range(0, len(weights), chunk):
                rows = slice(start, start + chunk)
                per_detection = weights[rows][:, matches.image_index]  # [b, D]
                running_total = np.cumsum(per_detection, axis=1)
                safe = np.where(present[rows], positives[rows], 1.0)
                mask = present[rows].astype(np.float64)
                for t in range(thresholds):
                    tp = np.cumsum(per_detection[:, hits[t]], axis=1)
                    seen = _weighted_count_through(per_detection, running_total, counted[t], hits[t])
                    q = _interpolated_precision(tp, seen, safe, recalls)  # [b, R]
                    metric = "AP" if area_name == "all" else "APs"
                    totals[metric][rows] += q.sum(axis=-1) * mask
                    counts[metric][rows] += q.shape[-1] * mask
                    if area_name == "all" and t == 0:
                        totals["AP50"][rows] += q.sum(axis=-1) * mask
                        counts["AP50"][rows] += q.shape[-1] * mask
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: np.where(counts[name] > 0, totals[name] / np.maximum(counts[name], 1), np.nan)
                for name in totals}


def resample_weights(num_images: int, samples: int, seed: int = SEED) -> np.ndarray:
    """[samples, num_images] counts: each row draws `num_images` images with replacement (a multinomial)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=samples).astype(np.float64)


def image_set_digest(image_ids: Sequence[int]) -> str:
    """A short digest of the sorted image ids: two replicate sets pair only when their digests match."""
    text = ",".join(str(i) for i in sorted(int(i) for i in image_ids))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bias_corrected_interval(values: np.ndarray, point: float, level: float = LEVEL) -> tuple[float, float] | None:
    """Bias-corrected percentile interval (BC) of a statistic whose full-sample value is `point`, from its
    bootstrap replicates `values`; None when fewer than 90 % of the replicates are defined (finite).

    With z0 = Phi^-1(share of replicates below `point`, ties counting half), the interval runs between the
    replicates' Phi(2 z0 -+ z_{1-(1-level)/2}) quantiles; z0 = 0 (replicates centred on the point) gives the plain
    percentile interval.
    """
    finite = np.sort(values[np.isfinite(values)])
    if len(finite) == 0 or len(finite) < 0.9 * len(values) or not math.isfinite(point):
        return None
    below = (np.count_nonzero(finite < point) + 0.5 * np.count_nonzero(finite == point)) / len(finite)
    below = min(max(below, 0.5 / len(finite)), 1 - 0.5 / len(finite))  # finite z0 when every replicate is on one side
    normal = NormalDist()
    z0, z = normal.inv_cdf(below), normal.inv_cdf(1 - (1 - level) / 2)
    low, high = np.quantile(finite, [normal.cdf(2 * z0 - z), normal.cdf(2 * z0 + z)])
    return float(low), float(high)


@dataclass(frozen=True)
class Replicates:
    """A model's metrics on each bootstrap resample of its validation images (fractions; NaN = undefined).

    Attributes:
        seed: the resampling seed.
        images: `image_set_digest` of the evaluated image ids.
        num_images: how many images were evaluated.
        values: metric -> one value per resample.
        point: metric -> its value on the whole image set (what the intervals are about).
    """

    seed: int
    images: str
    num_images: int
    values: dict[str, list[float]]
    point: dict[str, float]

    @property
    def samples(self) -> int:
        return len(next(iter(self.values.values()), []))

    def interval(self, metric: str, level: float = LEVEL) -> tuple[float, float] | None:
        """The BC interval of `metric` (None: too few resamples define it, e.g. no small objects)."""
        return bias_corrected_interval(np.asarray(self.values[metric], dtype=np.float64), self.point[metric], level)

    def pairs_with(self, other: Replicates) -> bool:
        """Same images, same resamples: the difference per resample is meaningful."""
        return (self.seed, self.images, self.num_images, self.samples) == (
            other.seed, other.images, other.num_images, other.samples)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null)."""
        return {"seed": self.seed, "images": self.images, "num_images": self.num_images,
                "values": {k: [v if math.isfinite(v) else None for v in vs] for k, vs in self.values.items()},
                "point": {k: v if math.isfinite(v) else None for k, v in self.point.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replicates:
        values = {str(k): [math.nan if v is None else float(v) for v in vs] for k, vs in data["values"].items()}
        point = {str(k): math.nan if v is None else float(v) for k, v in data["point"].items()}
        if len({len(v) for v in values.values()}) > 1 or set(point) != set(values):
            raise ValueError("every metric needs the same number of resamples and a point value")
        return cls(int(data["seed"]), str(data["images"]), int(data["num_images"]), values, point)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


def bootstrap(evaluator: COCOeval, samples: int, seed: int = SEED) -> Replicates:
    """AP, AP50 and APs on `samples` resamples of the evaluator's images (after `evaluate()`), and on all of them."""
    image_ids = list(evaluator.params.imgIds)
    values = weighted_accumulate(evaluator, resample_weights(len(image_ids), samples, seed))
    point = weighted_accumulate(evaluator, np.ones((1, len(image_ids))))
    return Replicates(seed, image_set_digest(image_ids), len(image_ids),
                      {k: [float(x) for x in v] for k, v in values.items()}, {k: float(v[0]) for k, v in point.items()})


@dataclass(frozen=True)
class Difference:
    """`a - b` of one metric with its paired bootstrap interval; `real` when the interval excludes zero."""

    metric: str
    point: float
    low: float
    high: float

    @property
    def real(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: Replicates, b: Replicates, metric: str, level: float = LEVEL) -> Difference | None:
    """a - b on the same resampled image sets; None when they do not pair or the metric is mostly undefined.

    Args:
        a, b: the two models' replicates (same images, seed and number of resamples).
        metric: one of BOOTSTRAP_METRICS.
    """
    return seed_averaged_difference([(a, b)], metric, level)


def seed_averaged_difference(pairs: Sequence[tuple[Replicates, Replicates]], metric: str,
                             level: float = LEVEL, seed: int = SEED) -> Difference | None:
    """a - b averaged over training seeds, with a two-level bootstrap: each resample draws the seeds with
    replacement, then uses those seeds' paired image resample, so both seed-to-seed and image noise widen it.
    With one pair it is the plain paired difference.

    Args:
        pairs: per seed (a's replicates, b's replicates); all must pair (same images and resamples).
        metric: one of BOOTSTRAP_METRICS.
    """
    if not pairs or not all(a.pairs_with(b) and a.pairs_with(pairs[0][0]) for a, b in pairs):
        return None
    per_seed = np.stack([np.asarray(a.values[metric], dtype=np.float64) - np.asarray(b.values[metric], dtype=np.float64)
                         for a, b in pairs])  # [S, B]
    seeds, samples = per_seed.shape
    if seeds == 1:
        combined = per_seed[0]
    else:
        rng = np.random.Generator(np.random.PCG64(seed + 1))
        drawn = rng.integers(0, seeds, size=(samples, seeds))  # [B, S] seeds of each resample
        combined = per_seed[drawn, np.arange(samples)[:, None]].mean(axis=1)
    point = float(np.mean([a.point[metric] - b.point[metric] for a, b in pairs]))
    bounds = bias_corrected_interval(combined, point, level)
    return None if bounds is None else Difference(metric, point, *bounds)
