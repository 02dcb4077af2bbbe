"""Do the report's 95 % intervals for a difference of two models cover the true difference 95 % of the time?

Draws many synthetic experiments whose true difference is known and counts how often each interval method covers
it, for 1, 2, 3, 5 and 10 training seeds. Each experiment: `--images` validation images, shared by every seed (as in
a sweep: all seeds are scored on the same images); per seed s and image i the paired difference of the two models is

    true + u_s + a_i + b_si       u_s: the seed's training noise; a_i: image noise every seed shares;
                                  b_si: image noise of that seed alone (a model-by-image interaction)

and each model's AP on an image set is the mean of its per-image scores (model B a random base, model A that base
plus the difference). The sizes come from two observed numbers: `--image-halfwidth`, the half-width of one seed's
95 % paired image-bootstrap interval (sets Var(a) + Var(b)), and `--seed-sd`, the SD of the per-seed differences
across seeds (sets Var(u) + Var(b) / images); `--shared` splits the image variance between a (shared) and b. The
defaults are the KD comparison of the 900-iteration fidelity run in benchmarks/RESULTS.md (per-seed half-widths
0.4-0.5 AP, per-seed differences +0.8 / +0.1 / +1.1, SD 0.5); `--seed-sd 0.1 --image-halfwidth 0.3` is its C-FF
comparison.

Each model's bootstrap replicates are made as a sweep makes them (`msad.engine.bootstrap.resample_weights` with the
project's seed, `--samples` resamples, the replicates as `Replicates`), and the methods the report uses run through
`seed_averaged_difference`; the others are candidates that the report does not use:

  report                the report: one seed, the paired image bootstrap (BC); several, `seed_t_interval`
                        (t(S-1) half-width over the seeds and the normal one of the image noise they share, added
                        in quadrature)
  two-level bootstrap   seed_averaged_difference(method="two-level"): seeds, then images, resampled (the old report)
  images only           BC interval of the seed-averaged paired replicates: ignores training noise
  t over seeds          mean +- t(S-1) * SD / sqrt(S) of the per-seed differences: ignores the shared image noise
  t + shared, df S-1    the report's two variances (SD^2 / S + shared image variance) summed, with t(S-1)
  t + shared, Satterthwaite df   the same sum with Welch-Satterthwaite's degrees of freedom
  two-level, rescaled   the two-level replicates' SD times sqrt(S / (S-1)) and t(S-1)

Cells are coverage in % (Monte-Carlo SE about 0.5 points at 2,000 draws) and the mean interval width in AP points.
With one seed the truth is also the seed's own expected difference (what that interval claims to cover).

    python benchmarks/interval_coverage.py --draws 2000
    python benchmarks/interval_coverage.py --draws 2000 --seed-sd 0.1 --image-halfwidth 0.3
    python benchmarks/interval_coverage.py --draws 2000 --shared 0
    python benchmarks/interval_coverage.py --draws 2000 --shared 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad.engine.bootstrap import (  # noqa: E402
    SEED,
    Replicates,
    bias_corrected_interval,
    image_set_digest,
    resample_weights,
    seed_averaged_difference,
    shared_image_variance,
    t_quantile,
    two_level_replicates,
)

METHODS = ("report", "two-level bootstrap", "images only", "t over seeds", "t + shared, df S-1",
           "t + shared, Satterthwaite df", "two-level, rescaled")
OWN_SEED = "report, 1 seed: of that seed's own difference"


@dataclass(frozen=True)
class Noise:
    """The experiment's noise, in AP fractions (0.005 = half an AP point).

    Attributes:
        image_sd: SD of one seed's difference over image sets (its paired bootstrap SD).
        seed_sd: SD of the per-seed differences across seeds, on one image set.
        shared: share of image_sd's variance that every seed has in common.
        images: validation images.
    """

    image_sd: float
    seed_sd: float
    shared: float
    images: int

    @property
    def training_sd(self) -> float:
        """SD of u, the seed's own training noise: what seed_sd leaves after the seeds' own image noise."""
        return math.sqrt(max(0.0, self.seed_sd ** 2 - (1 - self.shared) * self.image_sd ** 2))

    def differences(self, rng: np.random.Generator, draws: int, seeds: int, truth: float) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """[draws, seeds, images] per-image differences and [draws, seeds] each seed's expected difference."""
        per_image = math.sqrt(self.images)  # an image mean of n scores has 1/sqrt(n) of their SD
        shared = rng.normal(0, per_image * self.image_sd * math.sqrt(self.shared), (draws, 1, self.images))
        own = rng.normal(0, per_image * self.image_sd * math.sqrt(1 - self.shared), (draws, seeds, self.images))
        training = truth + rng.normal(0, self.training_sd, (draws, seeds))
        return training[:, :, None] + shared + own, training


def _replicates(scores: np.ndarray, weights: np.ndarray, digest: str) -> Replicates:
    """One model's Replicates from its per-image scores [I], as an evaluation would keep them."""
    values = weights @ scores / len(scores)
    return Replicates(SEED, digest, len(scores), {"AP": values}, {"AP": float(scores.mean())})


def coverage(noise: Noise, seeds: int, draws: int, truth: float, samples: int, level: float,
             rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """method -> (share of draws whose interval holds the truth, mean width); both in fractions."""
    weights = resample_weights(noise.images, samples)  # the resamples every evaluation of these images uses
    digest = image_set_digest(range(noise.images))
    differences, own_truth = noise.differences(rng, draws, seeds, truth)
    base = rng.normal(0.42, 0.2, (draws, seeds, noise.images))  # model B's per-image scores (they cancel in pairs)
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    hits = {m: [] for m in (*METHODS, OWN_SEED)}
    widths = {m: [] for m in hits}

    def record(method: str, bounds: tuple[float, float] | None, target: float = truth) -> None:
        low, high = bounds if bounds is not None else (math.nan, math.nan)
        hits[method].append(low <= target <= high)
        widths[method].append(high - low)

    for d in range(draws):
        pairs = [(_replicates(base[d, s] + differences[d, s], weights, digest),
                  _replicates(base[d, s], weights, digest)) for s in range(seeds)]
        report = seed_averaged_difference(pairs, "AP", level)
        record("report", (report.low, report.high))
        per_seed = np.array(report.per_seed)
        replicate_differences = np.stack([np.asarray(a.values["AP"]) - np.asarray(b.values["AP"]) for a, b in pairs])
        record("images only", bias_corrected_interval(replicate_differences.mean(axis=0), report.point, level))
        if seeds == 1:
            record(OWN_SEED, (report.low, report.high), own_truth[d, 0])
            continue
        old = seed_averaged_difference(pairs, "AP", level, method="two-level")
        record("two-level bootstrap", (old.low, old.high))
        t = t_quantile(1 - (1 - level) / 2, seeds - 1)
        half = t * per_seed.std(ddof=1) / math.sqrt(seeds)
        record("t over seeds", (report.point - half, report.point + half))
        shared = shared_image_variance(replicate_differences)
        half = t * math.sqrt(per_seed.var(ddof=1) / seeds + shared)
        record("t + shared, df S-1", (report.point - half, report.point + half))
        spread = per_seed.var(ddof=1) / seeds
        df = (spread + shared) ** 2 / (spread ** 2 / (seeds - 1)) if spread > 0 else math.inf
        half = t_quantile(1 - (1 - level) / 2, df) * math.sqrt(spread + shared)
        record("t + shared, Satterthwaite df", (report.point - half, report.point + half))
        rescaled = t / z * math.sqrt(seeds / (seeds - 1)) * two_level_replicates(replicate_differences).std(ddof=1)
        record("two-level, rescaled", (report.point - z * rescaled, report.point + z * rescaled))
    return {m: (float(np.mean(hits[m])), float(np.mean(widths[m]))) for m in hits if hits[m]}


def table(results: dict[int, dict[str, tuple[float, float]]]) -> str:
    """Markdown: a row per method, a column per seed count; cells 'coverage % (mean width in AP points)'."""
    seeds = list(results)
    lines = ["| method | " + " | ".join(f"{s} seed{'s' if s > 1 else ''}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for method in (*METHODS, OWN_SEED):
        cells = [f"{100 * results[s][method][0]:.1f} ({100 * results[s][method][1]:.2f})" if method in results[s]
                 else "-" for s in seeds]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(noise: Noise, seed_counts: list[int], draws: int, truth: float, samples: int, level: float, rng_seed: int,
        progress: Callable[[str], None] = lambda _: None) -> dict[int, dict[str, tuple[float, float]]]:
    results = {}
    for seeds in seed_counts:
        started = time.perf_counter()
        results[seeds] = coverage(noise, seeds, draws, truth, samples, level, np.random.default_rng([rng_seed, seeds]))
        progress(f"{seeds} seed(s): {time.perf_counter() - started:.1f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000, help="synthetic experiments per seed count")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    parser.add_argument("--images", type=int, default=128, help="validation images (the built-in benchmark's 128)")
    parser.add_argument("--samples", type=int, default=500, help="bootstrap resamples (train.bootstrap_samples)")
    parser.add_argument("--image-halfwidth", type=float, default=0.45,
                        help="half-width of one seed's 95%% paired image interval, AP points")
    parser.add_argument("--seed-sd", type=float, default=0.5, help="SD of the per-seed differences, AP points")
    parser.add_argument("--shared", type=float, default=0.5,
                        help="share of the image variance common to all seeds (0: none, 1: all)")
    parser.add_argument("--difference", type=float, default=0.7, help="the true difference, AP points")
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--rng", type=int, default=0)
    args = parser.parse_args()
    z = NormalDist().inv_cdf(1 - (1 - args.level) / 2)
    noise = Noise(args.image_halfwidth / 100 / z, args.seed_sd / 100, args.shared, args.images)
    if args.seed_sd ** 2 < (1 - args.shared) * (args.image_halfwidth / z) ** 2:
        print("note: --seed-sd is below the seeds' own image noise; training noise set to 0")
    started = time.perf_counter()
    results = run(noise, args.seeds, args.draws, args.difference / 100, args.samples, args.level, args.rng,
                  lambda line: print(line, file=sys.stderr, flush=True))
    print(f"Coverage of a true difference of {args.difference:+.2f} AP by {100 * args.level:g} % intervals, "
          f"{args.draws} draws per column: {args.images} images, {args.samples} resamples, one seed's image "
          f"half-width {args.image_halfwidth} AP, seed SD {args.seed_sd} AP (training part "
          f"{100 * noise.training_sd:.2f}), shared image variance {args.shared:g}. "
          f"Cells: coverage % (mean width, AP points). {time.perf_counter() - started:.0f} s.\n")
    print(table(results))


if __name__ == "__main__":
    main()
