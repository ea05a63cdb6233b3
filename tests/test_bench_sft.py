"""bench/sft_step.py keeps running: its --quick mode finishes and writes complete, sane JSON.

Speed is never asserted here (machines differ and are shared); only that every timing exists and is positive, and
that each ltpost run and its raw loop saw the same batches, did the same work and computed bit-identical losses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("raw", "ltpost", "ltpost+tensorboard", "raw-padded", "ltpost-padded")
BASELINES = {"ltpost": "raw", "ltpost+tensorboard": "raw", "ltpost-padded": "raw-padded"}


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_sft_step_bench_quick(tmp_path):
    output = tmp_path / "x.json"
    completed = subprocess.run(
        [sys.executable, "bench/sft_step.py", "--quick", "--output", str(output)],
        cwd=REPO,
        check=False,  # the return code is asserted below, with the output
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| variant |" in completed.stdout  # the markdown tables are printed

    result = json.loads(output.read_text())
    assert {"config", "env", "checks", "summary", "padding", "runs"} <= set(result)
    assert result["config"]["quick"] is True
    assert result["config"]["batch_size"] == 16
    assert result["config"]["log_every_n_steps"] == 50
    assert result["env"]["torch_threads"] == 1
    steps = result["config"]["steps"]

    # Each ltpost run and its raw loop: same batches, metrics on the same steps, bit-identical losses.
    checks = result["checks"]
    assert set(checks) == set(BASELINES) | {"padding_free_vs_padded"}
    for name, baseline in BASELINES.items():
        check = checks[name]
        assert check["baseline"] == baseline, name
        assert check["identical_batches"] is True, name
        assert check["losses_bitwise_equal"] is True, name
        assert check["max_abs_loss_diff"] == 0.0, name
        assert check["first_step_loss"]["ltpost"] == check["first_step_loss"]["raw"], name
        assert math.isfinite(check["first_step_loss"]["raw"]), name
        assert check["same_metric_steps"] is True, name
        assert check["metric_steps"] == [0], name  # is_logging_step: step 0, then every 50th (beyond --quick)
        assert check["steps_compared"] == steps * result["config"]["rounds"], name
    # Padding-free and padded batches hold the same tokens; their losses agree to rounding.
    padding_check = checks["padding_free_vs_padded"]
    assert padding_check["same_tokens"] is True
    assert padding_check["first_step_loss_diff"] <= padding_check["tolerance"]

    summary = result["summary"]
    assert set(summary) == set(VARIANTS)
    for name, entry in summary.items():
        assert 0.0 <= entry["padding_fraction"] < 1.0, name
        assert entry.get("baseline") == BASELINES.get(name), name
        for clock in ("wall", "cpu"):
            timings = entry[clock]
            for key in ("step_s", "iter_s", "fit_s", "tokens_per_s"):
                assert positive(timings[key]), (name, clock, key, timings[key])
            if name in BASELINES:
                for key in ("ratio_step_paired", "ratio_step", "ratio_iter", "ratio_sum"):
                    assert positive(timings[key]), (name, clock, key, timings[key])
                assert len(timings["ratio_step_paired_per_round"]) == result["config"]["rounds"]
                assert all(positive(r) for r in timings["ratio_step_paired_per_round"])
    assert summary["ltpost"]["padding_fraction"] == 0.0  # padding-free batches hold no padding at all
    assert summary["ltpost-padded"]["padding_fraction"] > 0.0
    assert summary["ltpost"]["tokens_per_step"] == summary["ltpost-padded"]["tokens_per_step"]

    padding = result["padding"]
    assert (padding["variant"], padding["baseline"]) == ("ltpost", "ltpost-padded")
    for clock in ("wall", "cpu"):
        for key in ("ratio_step_paired", "ratio_step", "ratio_sum", "speedup_paired"):
            assert positive(padding[clock][key]), (clock, key)
        for name in ("ltpost", "ltpost-padded"):
            assert positive(padding[clock]["step_s"][name]) and positive(padding[clock]["tokens_per_s"][name])

    assert sorted(run["variant"] for run in result["runs"]) == sorted(VARIANTS * result["config"]["rounds"])
    for run in result["runs"]:
        for clock in ("wall", "cpu"):
            assert len(run["step_s"][clock]) == steps
            assert len(run["iter_s"][clock]) == steps - 1
            assert all(positive(t) for t in run["step_s"][clock] + run["iter_s"][clock])
            assert positive(run["fit_s"][clock])
        assert len(run["losses"]) == steps and all(math.isfinite(loss) for loss in run["losses"])
        assert len(run["tokens"]) == len(run["slots"]) == steps
