"""The report's 95 % intervals hold their level: a fast run of benchmarks/interval_coverage.py's simulation.

Synthetic experiments with a known true difference, the noise sizes of the fidelity run's KD comparison (one
seed's paired image interval +-0.45 AP, per-seed differences 0.5 AP apart, half the image noise shared by all
seeds), scored through the project's own `seed_averaged_difference`. 1,000 draws per seed count: a coverage of
95 % has a Monte-Carlo SE of 0.7 points, so the 92 % bar is 4 SE below it. Negative control: the old two-level
bootstrap, on the same draws, falls below the bar at 2 and 3 seeds.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from benchmarks.interval_coverage import OWN_SEED, Noise, coverage

DRAWS = 1000
# the script's defaults: `python benchmarks/interval_coverage.py --draws 1000` draws these same experiments
KD_LIKE = Noise(image_sd=0.0045 / NormalDist().inv_cdf(0.975), seed_sd=0.005, shared=0.5, images=128)


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_the_reports_seed_interval_holds_95_percent_and_the_old_bootstrap_does_not(seeds: int) -> None:
    found = coverage(KD_LIKE, seeds, DRAWS, 0.007, 500, 0.95, np.random.default_rng([0, seeds]))
    assert 0.92 <= found["report"][0] <= 0.99  # and not absurdly wide: "t + shared, df S-1" covers 99.6-100 %
    if seeds <= 3:
        assert found["two-level bootstrap"][0] < 0.92  # negative control: too narrow with 2-3 seeds
        assert found["t + shared, df S-1"][0] > 0.99  # and one too wide, which the upper bar would refuse
    assert found["images only"][0] < 0.85  # ignoring training noise misses it at every seed count


def test_one_seed_covers_its_own_difference_but_not_another_training_run() -> None:
    """With one seed the report keeps the paired image interval: it covers that seed's own expected difference at
    its level, and says little about the over-seeds difference when seeds differ more than images do."""
    found = coverage(KD_LIKE, 1, DRAWS, 0.007, 500, 0.95, np.random.default_rng([0, 1]))
    assert 0.92 <= found[OWN_SEED][0] <= 0.98
    assert found["report"][0] < 0.75  # negative control: the same intervals against the over-seeds truth
