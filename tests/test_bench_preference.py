"""bench/preference_step.py keeps running: its --quick mode finishes and writes complete, sane JSON.

Speed is never asserted here (machines differ and are shared); only that every timing exists and is positive, and
that ltpost and the raw loop computed the same losses on the same batches (from the first step on).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARISONS = ("dpo-precompute", "dpo-copy", "dpo-precompute-padded", "reward")
VARIANTS = tuple(f"{comparison}/{side}" for comparison in COMPARISONS for side in ("raw", "ltpost"))


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_preference_step_bench_quick(tmp_path):
    output = tmp_path / "x.json"
    completed = subprocess.run(
        [sys.executable, "bench/preference_step.py", "--quick", "--output", str(output)],
        cwd=REPO,
        check=False,  # the return code is asserted below, with the output
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| variant |" in completed.stdout  # the markdown table is printed

    result = json.loads(output.read_text())
    assert {"config", "env", "checks", "summary", "runs"} <= set(result)
    assert result["config"]["quick"] is True
    assert result["config"]["batch_size"] == 16
    assert result["env"]["torch_threads"] == 1

    # Both sides saw the same batches and computed equal losses, on the first step and on every later one.
    assert set(result["checks"]) == set(COMPARISONS)
    for comparison, check in result["checks"].items():
        assert check["identical_batches"] is True, comparison
        first = check["first_step_loss"]
        assert math.isfinite(first["ltpost"]) and math.isfinite(first["raw"]), comparison
        assert first["ltpost"] == pytest.approx(first["raw"], abs=1e-5), comparison
        assert check["first_step_loss_diff"] <= 1e-5, comparison
        assert check["max_abs_loss_diff"] <= 1e-5, comparison
    for comparison in ("dpo-precompute", "dpo-copy", "dpo-precompute-padded"):
        # The policy starts as its own reference, so DPO's first loss is exactly log 2 on both sides.
        assert result["checks"][comparison]["first_step_loss"]["raw"] == pytest.approx(math.log(2), abs=1e-6)

    summary = result["summary"]
    assert set(summary) == set(VARIANTS)
    for name, entry in summary.items():
        assert 0.0 <= entry["padding_fraction"] < 1.0, name
        assert entry["tokens_per_step"] > 0, name
        for clock in ("wall", "cpu"):
            timings = entry[clock]
            for key in ("step_s", "iter_s", "fit_s", "tokens_per_s"):
                assert positive(timings[key]), (name, clock, key, timings[key])
            if entry["reference"] is not None:  # the one-time precompute pass or copy load, reported apart
                assert positive(timings["reference_setup_s"]), (name, clock)
            if name.endswith("/ltpost"):
                assert entry["baseline"] == name.replace("/ltpost", "/raw")
                for key in ("ratio_step_paired", "ratio_step", "ratio_iter"):
                    assert positive(timings[key]), (name, clock, key, timings[key])
                assert all(positive(r) for r in timings["ratio_step_paired_per_round"])
    for side in ("raw", "ltpost"):
        assert summary[f"dpo-precompute/{side}"]["padding_fraction"] == 0.0  # padding-free batches hold no padding
        assert summary[f"dpo-precompute-padded/{side}"]["padding_fraction"] > 0.0
        assert summary[f"dpo-precompute/{side}"]["reference"] == "precompute"
        assert summary[f"dpo-copy/{side}"]["reference"] == "copy"
        assert summary[f"reward/{side}"]["reference"] is None

    assert {run["variant"] for run in result["runs"]} == set(VARIANTS)
    steps = result["config"]["steps"]
    for run in result["runs"]:
        for clock in ("wall", "cpu"):
            assert len(run["step_s"][clock]) == steps
            assert len(run["iter_s"][clock]) >= steps - 1
            assert all(positive(t) for t in run["step_s"][clock] + run["iter_s"][clock])
            assert positive(run["fit_s"][clock])
        assert len(run["losses"]) == steps and all(math.isfinite(loss) for loss in run["losses"])
        assert len(run["tokens"]) == steps and all(t > 0 for t in run["tokens"])
