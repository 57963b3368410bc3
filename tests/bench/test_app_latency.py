"""The latency bench's arithmetic and report; the browser run itself is not a test."""

import math

import numpy as np
import pytest

from bench.app_latency import MILESTONES, markdown_table, milestones, report, summarize


def _reference_percentile(values, q):
    """Linear interpolation between closest ranks, written out."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_matches_a_written_out_percentile(seed):
    values = list(np.random.default_rng(seed).gamma(2.0, 150.0, size=int(seed * 37 + 5)))
    stats = summarize(values)
    assert stats["n"] == len(values)
    assert stats["p50"] == pytest.approx(_reference_percentile(values, 50))
    assert stats["p95"] == pytest.approx(_reference_percentile(values, 95))
    assert stats["max"] == max(values)
    assert stats["mean"] == pytest.approx(sum(values) / len(values))


def test_summary_of_small_and_empty_lists():
    assert summarize([120.0]) == {"n": 1, "p50": 120.0, "p95": 120.0, "max": 120.0, "mean": 120.0}
    # 100 decisions 1..100 ms: p95 sits between the 95th and 96th.
    assert summarize([float(k) for k in range(1, 101)])["p95"] == pytest.approx(95.05)
    empty = summarize([])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("p50", "p95", "max", "mean"))


def test_milestones_count_from_the_key_or_the_navigation():
    marks = {"running": 1040.0, "label": 1230.0, "picture": 1290.0, "shown": 1290.0}
    marks |= {"idle": 1300.0, "image": 17}
    after_key = milestones({"key": 1000.0, "origin": 5_000_000.0, "marks": marks})
    assert after_key == {
        "running": 40.0,
        "label": 230.0,
        "picture": 290.0,
        "shown": 290.0,
        "idle": 300.0,
        "start_unix_s": 5001.0,
    }
    first_page = milestones({"key": None, "origin": 5_000_000.0, "marks": marks})
    assert first_page["shown"] == 1290.0 and first_page["start_unix_s"] == 5000.0


def test_markdown_table_pads_columns():
    table = markdown_table(["measure", "p50 ms"], [["key -> shown", "310"], ["cold", "2900"]])
    lines = table.splitlines()
    assert lines[0] == "| measure      | p50 ms |"
    assert lines[1] == "|--------------|--------|"
    assert lines[2] == "| key -> shown |    310 |"
    assert lines[3] == "| cold         |   2900 |"


def test_report_names_missed_targets():
    keystroke = {name: summarize([100.0, 200.0, 450.0]) for name in MILESTONES}
    result = {
        "config": {"key": "Shift+A", "decisions": 3, "think_ms": 500.0},
        "images": 10,
        "boxes": 30,
        "build_seconds": None,
        "server_start_seconds": 2.0,
        "load_before": 1.0,
        "load_after": 1.5,
        "images_decided": 3,
        "cold": {"shown": 2500.0},
        "warm": {"shown": 900.0},
        "keystroke": keystroke,
        "server_steps": {"claim next image (transaction)": summarize([3.0, 4.0])},
    }
    text = report(result)
    assert "reused" in text and "claim next image" in text
    assert "first page met" in text and "next image p95 MISSED" in text
