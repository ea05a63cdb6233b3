"""bench/online_step.py keeps running: its --quick mode finishes and writes complete, sane JSON.

Speed is never asserted here (machines differ and are shared); only that every timing exists and is positive, that
the time split adds up, and that each ltpost run and its raw loop saw the same prompts, sampled the same
completions, computed bit-identical losses and final weights, and ran the same forwards (none wasted).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAIRS = ("grpo", "rloo", "rloo-kl")
VARIANTS = tuple(f"{side}-{pair}" for pair in PAIRS for side in ("raw", "ltpost"))
PHASES = ("generation", "scoring", "training")


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_online_step_bench_quick(tmp_path):
    output = tmp_path / "x.json"
    completed = subprocess.run(
        [sys.executable, "bench/online_step.py", "--quick", "--output", str(output)],
        cwd=REPO,
        check=False,  # the return code is asserted below, with the output
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| variant |" in completed.stdout and "| pair |" in completed.stdout  # the markdown tables are printed

    result = json.loads(output.read_text())
    assert {"config", "env", "checks", "summary", "pairs", "runs"} <= set(result)
    config = result["config"]
    assert config["quick"] is True
    assert (config["batch_size"], config["num_generations"], config["max_completion_length"]) == (16, 8, 8)
    assert config["log_every_n_steps"] == 50
    assert config["grpo"]["loss_type"] == "dapo"
    assert result["env"]["torch_threads"] == 1
    steps, rounds, warmup = config["steps"], config["rounds"], config["warmup"]

    # Each ltpost run and its raw loop did the same work: same prompts, completions and rewards, bit-identical
    # losses and final weights, entropy on the same steps, the same forwards, and none wasted.
    checks = result["checks"]
    assert set(checks) == set(PAIRS)
    for pair, check in checks.items():
        assert (check["ltpost"], check["raw"]) == (f"ltpost-{pair}", f"raw-{pair}")
        for key in (
            "identical_prompts",
            "identical_completions",
            "identical_rewards",
            "losses_bitwise_equal",
            "final_weights_equal",
            "same_entropy_steps",
            "forwards_equal",
            "no_wasted_forward",
        ):
            assert check[key] is True, (pair, key)
        assert check["max_abs_loss_diff"] == 0.0, pair
        assert check["first_step_loss"]["ltpost"] == check["first_step_loss"]["raw"], pair
        assert math.isfinite(check["first_step_loss"]["raw"]), pair
        assert check["entropy_steps"] == [0], pair  # is_logging_step: step 0, then every 50th (beyond --quick)
        assert check["ltpost_extra_forwards_outside_generation"] <= 0, pair
        assert check["forwards_outside_per_row"] == (2 if pair == "rloo-kl" else 1), pair
        assert check["steps_compared"] == steps * rounds, pair

    summary = result["summary"]
    assert set(summary) == set(VARIANTS)
    for name, entry in summary.items():
        rows = entry["rows_per_step"]
        assert len(rows) == steps and all(r >= 1 for r in rows), name
        assert len(entry["forwards_generation_per_step"]) == steps
        # Sampling runs one prefill forward (the prompts' shared KV cache: HFRolloutEngine.prefill_once) and one
        # forward per generated token at most; outside it, one training forward per packed row (plus the old-policy
        # forward and one reference forward per row when the KL needs them).
        assert all(1 <= f <= 1 + config["max_completion_length"] for f in entry["forwards_generation_per_step"]), name
        per_row = 2 if entry["beta"] else 1
        assert entry["forwards_outside_per_step"] == [per_row * r for r in rows], name
        assert entry["forwards_reference_per_step"] == [r if entry["beta"] else 0 for r in rows], name
        assert entry["completion_tokens_per_step"] > 0, name
        assert 0.0 <= entry["reward_mean"] <= 2.0, name  # integer_accuracy + even_token_fraction, each in [0, 1]
        assert entry["measured_steps"] == (steps - warmup) * rounds, name
        if entry["lightning"]:
            assert all(calls > 0 for calls in entry["log_calls_per_step"]), name
        for clock in ("wall", "cpu"):
            timings = entry[clock]
            for key in ("step_s", "iter_s", "generation_s", "scoring_s", "training_s", "outside_s", "fit_s"):
                assert positive(timings[key]), (name, clock, key, timings[key])
            shares = [timings[f"{phase}_share"] for phase in PHASES]
            assert all(0.0 < share < 1.0 for share in shares), (name, clock, shares)
            assert sum(shares) == pytest.approx(1.0), (name, clock, shares)  # the phases split the step
            assert len(timings["step_s_per_round"]) == rounds

    pairs = result["pairs"]
    assert set(pairs) == set(PAIRS)
    for pair, entry in pairs.items():
        assert (entry["ltpost"], entry["raw"]) == (f"ltpost-{pair}", f"raw-{pair}")
        for clock in ("wall", "cpu"):
            ratios = entry[clock]
            for key in ("total_paired", "total_sum", "outside_paired", "outside_sum", *(f"{p}_paired" for p in PHASES)):
                assert positive(ratios[key]), (pair, clock, key, ratios[key])
            for key in ("total_paired_per_round", "outside_paired_per_round"):
                assert len(ratios[key]) == rounds and all(positive(r) for r in ratios[key]), (pair, clock, key)

    assert sorted(run["variant"] for run in result["runs"]) == sorted(VARIANTS * rounds)
    for run in result["runs"]:
        for clock in ("wall", "cpu"):
            assert len(run["iter_s"][clock]) == steps - 1
            assert all(positive(t) for t in run["step_s"][clock] + run["iter_s"][clock])
            assert positive(run["fit_s"][clock])
            for phase in PHASES:
                assert len(run[f"{phase}_s"][clock]) == steps
            for i, step in enumerate(run["step_s"][clock]):
                parts = [run[f"{phase}_s"][clock][i] for phase in PHASES]
                assert all(part > 0 for part in parts), (run["variant"], clock, i, parts)
                assert sum(parts) == pytest.approx(step, rel=1e-9, abs=1e-12), (run["variant"], clock, i)
        assert len(run["losses"]) == steps and all(math.isfinite(loss) for loss in run["losses"])
        assert len(run["rewards"]) == len(run["rows"]) == len(run["completion_tokens"]) == steps
        assert len(run["forwards_outside"]) == len(run["forwards_generation"]) == steps
        assert run["weights_digest"] and run["completion_digest"]
