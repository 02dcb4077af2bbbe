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

Over several training seeds (`seed_averaged_difference`), the difference is averaged and its interval is a
t-interval over the per-seed differences (n - 1 degrees of freedom), widened by the image noise all seeds share
(the covariance of their paired replicates: every seed is scored on the same images), the two half-widths added in
quadrature (`seed_t_interval`). A bootstrap that resamples 2-3 seeds themselves understates their spread ((n-1)/n
of the variance, no t tails): in simulation (`benchmarks/interval_coverage.py`, the noise of the fidelity run's KD
comparison) it covered a known difference 83.5 % / 89.3 % of the time at 2 / 3 seeds for its 95 %, the t-interval
98.0 % / 97.2 % (96.8 % at 5 seeds, 95.4 % at 10).
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


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (continued fraction, modified Lentz; Numerical Recipes
    6.4), for 0 <= x <= 1 and a, b > 0."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below its mean: use the symmetry
        return 1.0 - _regularized_beta(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - math.log(a) - _log_beta(a, b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * _regularized_beta(df / (df + x * x), df / 2, 0.5)
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (the normal one for df = inf), by bisection on
    `t_cdf` (no scipy in the dependencies); above 10^4 degrees of freedom, Cornish-Fisher's expansion."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    z = NormalDist().inv_cdf(p)
    if df > 1e4:
        return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, max(1.0, 2 * z)
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


SEED_METHODS = ("t", "two-level")  # how seed_averaged_difference makes its interval over several seeds


@dataclass(frozen=True)
class Difference:
    """`a - b` of one metric with its interval; `real` when the interval excludes zero.

    Attributes:
        per_seed: each seed's own difference on the whole image set (one value with one seed); `point` is their mean.
        method: how the interval was made: "images" (one seed: the paired image bootstrap, which says nothing about
            another training run), "t" (several seeds: t-interval over them plus the image noise they share) or
            "two-level" (several seeds: seeds, then images, resampled; too narrow with few seeds, kept for
            comparison).
    """

    metric: str
    point: float
    low: float
    high: float
    per_seed: tuple[float, ...] = ()
    method: str = "images"

    @property
    def real(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def seeds(self) -> int:
        return max(1, len(self.per_seed))


def paired_difference(a: Replicates, b: Replicates, metric: str, level: float = LEVEL) -> Difference | None:
    """a - b on the same resampled image sets; None when they do not pair or the metric is mostly undefined.

    Args:
        a, b: the two models' replicates (same images, seed and number of resamples).
        metric: one of BOOTSTRAP_METRICS.
    """
    return seed_averaged_difference([(a, b)], metric, level)


def two_level_replicates(per_seed: np.ndarray, seed: int = SEED) -> np.ndarray:
    """[B] replicates of the seed-averaged difference from per-seed paired replicates [S, B]: resample b draws S
    seeds with replacement and averages their b-th image resample (the report's method before the t-interval)."""
    seeds, samples = per_seed.shape
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    drawn = rng.integers(0, seeds, size=(samples, seeds))  # [B, S] seeds of each resample
    return per_seed[drawn, np.arange(samples)[:, None]].mean(axis=1)


def shared_image_variance(replicates: np.ndarray) -> float:
    """The variance of image noise that S >= 2 seeds share: the mean covariance, over resamples, between two
    seeds' paired replicates [S, B] (same resamples); 0 when negative."""
    seeds = len(replicates)
    centred = replicates - replicates.mean(axis=1, keepdims=True)
    covariance = centred @ centred.T / max(1, centred.shape[1] - 1)  # [S, S]
    return max(0.0, float((covariance.sum() - np.trace(covariance)) / (seeds * (seeds - 1))))


def seed_t_interval(per_seed: np.ndarray, replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """An interval for the mean of S >= 2 per-seed differences: a t-interval over the seeds, widened by the image
    noise they share.

    The seeds' spread s (S - 1 degrees of freedom) holds training noise and each seed's own image noise. Every seed
    is scored on the same validation images, though, so part of the image noise is common to all of them, does not
    average out and is missing from s: its variance `shared` is the mean covariance between two seeds' paired
    replicates (same resamples). The two half-widths add in quadrature:

        mean +- sqrt((t_{S-1} s / sqrt(S))^2 + (z sqrt(shared))^2)

    (z: the normal quantile; `shared` comes from B resamples and counts as known). Measured coverage of a 95 %
    interval: `benchmarks/interval_coverage.py`.

    Args:
        per_seed: [S] each seed's difference on the whole image set.
        replicates: [S, B] each seed's paired bootstrap replicates of the difference (same resamples).

    Returns:
        (low, high); None with one seed, or when fewer than 90 % of the resamples are defined in every seed.
    """
    seeds = len(per_seed)
    defined = np.isfinite(replicates).all(axis=0)
    if seeds < 2 or not np.isfinite(per_seed).all() or np.count_nonzero(defined) < 0.9 * replicates.shape[1]:
        return None
    shared = shared_image_variance(replicates[:, defined])
    quantile = 1 - (1 - level) / 2
    over_seeds = t_quantile(quantile, seeds - 1) * float(np.std(per_seed, ddof=1)) / math.sqrt(seeds)
    half = math.hypot(over_seeds, NormalDist().inv_cdf(quantile) * math.sqrt(shared))
    mean = float(np.mean(per_seed))
    return mean - half, mean + half


def seed_averaged_difference(pairs: Sequence[tuple[Replicates, Replicates]], metric: str,
                             level: float = LEVEL, seed: int = SEED, method: str = "t") -> Difference | None:
    """a - b averaged over training seeds. With one pair: the paired image bootstrap's BC interval ("images").
    With several: `seed_t_interval` ("t", the default: measured to hold its level from 3 seeds on) or the older
    two-level bootstrap ("two-level": seeds drawn with replacement, then their paired image resample).

    Args:
        pairs: per seed (a's replicates, b's replicates); all must pair (same images and resamples).
        metric: one of BOOTSTRAP_METRICS.
        method: one of SEED_METHODS; used only with several pairs.
    """
    if method not in SEED_METHODS:
        raise ValueError(f"method must be one of {SEED_METHODS}, got {method!r}")
    if not pairs or not all(a.pairs_with(b) and a.pairs_with(pairs[0][0]) for a, b in pairs):
        return None
    per_seed = np.stack([np.asarray(a.values[metric], dtype=np.float64) - np.asarray(b.values[metric], dtype=np.float64)
                         for a, b in pairs])  # [S, B]
    points = np.array([a.point[metric] - b.point[metric] for a, b in pairs], dtype=np.float64)
    point = float(np.mean(points))
    if len(pairs) == 1:
        bounds, method = bias_corrected_interval(per_seed[0], point, level), "images"
    elif method == "t":
        bounds = seed_t_interval(points, per_seed, level)
    else:
        bounds = bias_corrected_interval(two_level_replicates(per_seed, seed), point, level)
    if bounds is None:
        return None
    return Difference(metric, point, *bounds, per_seed=tuple(float(p) for p in points), method=method)
