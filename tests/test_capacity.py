"""Measured capacity (backbone FLOPs relative to width 1.0 at 800 x 1333) against the paper's column."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from msad.models.capacity import (
    PUBLISHED_CAPACITY,
    backbone_flops,
    capacity_json,
    capacity_rows,
    format_capacity_table,
)
from msad.models.slimmable import WIDTHS


def test_width_one_counts_like_torchvision_resnet50_trunk() -> None:
    with torch.device("meta"):
        resnet = torchvision.models.resnet50(weights=None).eval()
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])  # without avgpool + fc
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trunk(torch.empty(1, 3, 224, 320, device="meta"))
    assert backbone_flops(1.0, 224, 320) == counter.get_total_flops()
    assert round(backbone_flops(1.0, 800, 1333) / 1e9, 1) == 174.7  # ResNet-50 at 800 x 1333: 87.3 GMACs


def test_capacity_matches_the_published_column() -> None:
    rows = capacity_rows()
    assert [(r.width, r.role, r.resolution) for r in rows] == [
        (w, role, res) for w in sorted(WIDTHS, reverse=True) for role, res in (("teacher", "H & L"), ("student", "L"))
    ]
    for row in rows:
        assert row.published_capacity == PUBLISHED_CAPACITY[row.width][row.role == "student"]
        assert row.capacity == pytest.approx(row.published_capacity, abs=0.015), row
    teacher = {r.width: r for r in rows if r.role == "teacher"}
    student = {r.width: r for r in rows if r.role == "student"}
    assert teacher[1.0].capacity == pytest.approx(1.25, abs=0.005)
    for w in WIDTHS:
        # Teacher = H + L with L a quarter of H's pixels; it also runs the head three times.
        assert teacher[w].capacity == pytest.approx(5 * student[w].capacity, rel=0.02)
        assert teacher[w].detector_gflops > 2.5 * student[w].detector_gflops
        assert student[w].detector_gflops > student[w].capacity * backbone_flops(1.0, 800, 1333) / 1e9


def test_table_and_json() -> None:
    rows = capacity_rows()
    table = format_capacity_table(rows).splitlines()
    assert table[0].split()[:5] == ["width", "role", "resolution", "capacity", "published"]
    assert len(table) == 1 + len(rows)
    assert len({len(line) for line in table[1:]}) == 1  # aligned columns
    assert "1.25x" in table[1] and "teacher" in table[1] and "H & L" in table[1]
    records = json.loads(json.dumps(capacity_json(rows)))
    assert records[1] == {
        "width": 1.0,
        "role": "student",
        "resolution": "L",
        "capacity": rows[1].capacity,
        "published_capacity": 0.25,
        "detector_gflops": rows[1].detector_gflops,
    }
