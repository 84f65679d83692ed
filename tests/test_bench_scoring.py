"""bench/bench_scoring.py: the E4B arithmetic, the label sets it builds, and a small run's last line."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scoring", REPO / "bench" / "bench_scoring.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scoring"] = module
    spec.loader.exec_module(module)
    return module


def test_causal_pairs(bench):
    assert bench.causal_pairs(0, 4, None) == 1 + 2 + 3 + 4
    assert bench.causal_pairs(0, 6, 3) == 1 + 2 + 3 + 3 + 3 + 3
    assert bench.causal_pairs(10, 12, None) == 11 + 12


def test_e4b_estimate(bench):
    """One pass per label at 400 labels is the ~14 s per clip (H100, 40% MFU) that makes Kinetics-400 take days."""
    est = bench.e4b_estimate(400)
    assert 12 < est["full_s_h100_40pct"] < 16
    assert est["ratio"] > 100 and est["prefix_tflop"] < 30
    # the prefix method pays the clip once: its cost grows by one continuation per label
    assert bench.e4b_estimate(401)["prefix_tflop"] - est["prefix_tflop"] == pytest.approx(est["per_label_gflop"] / 1e3)


def test_label_sets_keep_the_true_class(bench):
    from actionft.synth import CLASSES

    assert bench.label_set(9).classes == list(CLASSES)
    big = bench.label_set(400)
    assert len(big) == 400 and big.classes[:9] == list(CLASSES) and big.classes[9] == "abseiling"


def test_small_run_prints_the_summary_line(bench, tmp_path, capsys):
    rc = bench.main(["--labels", "2,12", "--clips", "1", "--data", str(tmp_path / "data"),
                     "--json", str(tmp_path / "out.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    assert re.fullmatch(r"speed-up: 2 labels \d+\.\dx, 12 labels \d+\.\dx, max \|score diff\| \d\.\de[-+]\d\d", last)
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["labels"] for r in rows] == [2, 12] and all(r["same_ranking"] for r in rows)
