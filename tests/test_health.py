"""TrainingHealth: every check on scripted metric sequences (fires, says why with the numbers, suggests the fix, and
stays quiet on a healthy sequence), the monitor's hysteresis and state, and real tiny runs that produce each
condition the embedded task can produce on CPU; NaN loss stops the run with a checkpoint that resumes; the run
report (text, JSON, PNG) on a real run.

``low-gpu-memory`` needs CUDA: it is driven by scripted sequences only. ``engine-logprob-mismatch`` on a real run
needs the vLLM engine: that test is in tests/test_vllm.py (a stale engine), beside the session's engine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from ltpost import (
    DPOModule,
    GRPOModule,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    SFTModule,
    TrainingHealth,
)
from ltpost.health import CHECKS, HealthMonitor, History, RunInfo
from ltpost.health import checks as C
from tests.helpers import cpu_trainer, even_token_reward

REPO = Path(__file__).resolve().parents[1]


def history(step_every: int = 1, **series: list[float]) -> History:
    """A History from sequences logged on steps 0, step_every, 2*step_every ...; ``__`` in a name stands for ``/``
    (``train__reward`` is ``train/reward``)."""
    result = History()
    for name, values in series.items():
        for i, value in enumerate(values):
            result.add(i * step_every, {name.replace("__", "/"): value})
    return result


INFO = RunInfo(step=100, max_steps=1000)


# -- every check on scripted sequences -----------------------------------------------------------------------------


def test_reward_std_collapse():
    """10 logged steps with 97% of groups all-equal: the mean frac is 0.97 >= 0.9, the mean std 0.004."""
    h = history(train__frac_reward_zero_std=[0.97] * 10, train__reward_std=[0.004] * 10, train__reward=[0.2] * 10)
    finding = C.reward_std_collapse(h, INFO)
    assert finding.code == "reward-std-collapse" and finding.severity == "warning"
    assert finding.evidence["frac_reward_zero_std"] == pytest.approx(0.97)
    assert finding.evidence["reward_std"] == pytest.approx(0.004)
    assert "frac_reward_zero_std=0.97" in finding.message and "group reward std is 0.004" in finding.message
    assert "temperature/num_generations" in finding.action and "denser" in finding.action
    assert finding.line().startswith("[ltpost] WARNING reward-std-collapse: group reward std is 0.004")
    healthy = history(train__frac_reward_zero_std=[0.3] * 10, train__reward_std=[0.2] * 10, train__reward=[0.2] * 10)
    assert C.reward_std_collapse(healthy, INFO) is None
    assert C.reward_std_collapse(history(train__frac_reward_zero_std=[1.0] * 9), INFO) is None  # window not full


def test_clip_ratio_high():
    """Mean region clip ratio over 5 steps = (0.3+0.3+0.4+0.4+0.6)/5 = 0.4 >= 0.2."""
    h = history(train__clip_ratio__region_mean=[0.3, 0.3, 0.4, 0.4, 0.6], lr=[1e-2] * 5)
    finding = C.clip_ratio_high(h, INFO)
    assert finding.code == "clip-ratio-high"
    assert finding.evidence["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert finding.evidence["learning_rate"] == pytest.approx(1e-2)
    assert "40% of completion tokens are clipped" in finding.message
    assert finding.action.startswith("Lower the learning rate")
    assert C.clip_ratio_high(history(train__clip_ratio__region_mean=[0.01] * 5), INFO) is None


def test_kl_blowup():
    """KL 0 at step 0, mean over the last 5 logged steps (0.6+0.7+0.8+0.9+1.0)/5 = 0.8 >= 0.5."""
    h = history(train__kl=[0.0, 0.1, 0.6, 0.7, 0.8, 0.9, 1.0])
    finding = C.kl_blowup(h, RunInfo(step=7, settings={"beta": 0.04}))
    assert finding.code == "kl-blowup"
    assert finding.evidence == pytest.approx({"kl": 0.8, "kl_first": 0.0, "beta": 0.04, "window": 5})
    assert "raise beta" in finding.action and "Lower the learning rate" in finding.action
    assert C.kl_blowup(history(train__kl=[0.0, 0.01, 0.02, 0.02, 0.03]), INFO) is None


def test_entropy_collapse():
    """Entropy starts at 2.0 (mean of the first 5), ends at 0.02 (< max(0.05, 0.1 * 2.0) = 0.2)."""
    h = history(train__entropy=[2.0] * 5 + [1.0] * 5 + [0.02] * 5, train__frac_reward_zero_std=[0.1] * 15)
    finding = C.entropy_collapse(h, INFO)
    assert finding.code == "entropy-collapse"
    assert finding.evidence["entropy"] == pytest.approx(0.02) and finding.evidence["entropy_start"] == 2.0
    assert "Raise temperature" in finding.action and "epsilon_high" in finding.action
    # SFT lowers the entropy on purpose: without the online metrics the check stays quiet.
    assert C.entropy_collapse(history(train__entropy=[2.0] * 5 + [0.02] * 10), INFO) is None


def test_entropy_explosion():
    """Entropy starts at 0.8 and reaches 2.4 = 3x the start (>= 2x and >= 1.0 nats)."""
    h = history(train__entropy=[0.8] * 5 + [1.2] * 5 + [2.4] * 5, train__frac_reward_zero_std=[0.1] * 15)
    finding = C.entropy_explosion(h, INFO)
    assert finding.code == "entropy-explosion"
    assert finding.evidence["entropy"] == pytest.approx(2.4) and finding.evidence["entropy_start"] == 0.8
    assert "3.0x where it started" in finding.message
    assert finding.action.startswith("Lower the learning rate or temperature")
    steady = history(train__entropy=[0.8] * 15, train__frac_reward_zero_std=[0.1] * 15)
    assert C.entropy_explosion(steady, INFO) is None


def test_completions_truncated():
    """80% of completions hit the limit of 8 tokens."""
    h = history(train__completions__clipped_ratio=[0.8] * 5, train__completions__mean_length=[8.0] * 5)
    finding = C.completions_truncated(h, RunInfo(step=5, settings={"max_completion_length": 8}))
    assert finding.code == "completions-truncated"
    assert finding.evidence["completions/clipped_ratio"] == pytest.approx(0.8)
    assert "max_completion_length=8" in finding.message
    assert "Raise max_completion_length" in finding.action and "soft_overlong_penalty" in finding.action
    assert C.completions_truncated(history(train__completions__clipped_ratio=[0.1] * 5), INFO) is None


def test_length_hacking():
    """Mean length 10 -> 30 tokens (3x, +20) over the first vs the last 10 logged steps, reward 0.2 -> 0.8."""
    h = history(train__completions__mean_length=[10.0] * 10 + [30.0] * 10, train__reward=[0.2] * 10 + [0.8] * 10)
    finding = C.length_hacking(h, INFO)
    assert finding.code == "length-hacking" and finding.area == "reward-hacking"
    assert finding.evidence == pytest.approx(
        {"reward_start": 0.2, "reward": 0.8, "mean_length_start": 10.0, "mean_length": 30.0}
    )
    assert "grew 3.0x" in finding.message and "length penalty" in finding.action
    # Longer answers that earn nothing more are not reward hacking.
    flat = history(train__completions__mean_length=[10.0] * 10 + [30.0] * 10, train__reward=[0.5] * 20)
    assert C.length_hacking(flat, INFO) is None


def test_engine_logprob_mismatch():
    """The engine's log-probs differ from the trainer's by 0.1 per token: above 0.05; the advice depends on whether
    the importance-sampling correction is already on."""
    h = history(
        train__sampling__sampling_logp_difference__mean=[0.1] * 5,
        train__sampling__sampling_logp_difference__max=[1.5] * 5,
    )
    finding = C.engine_logprob_mismatch(h, RunInfo(step=5, settings={"use_vllm": True}))
    assert finding.code == "engine-logprob-mismatch"
    assert finding.evidence == pytest.approx(
        {"sampling_logp_difference/mean": 0.1, "sampling_logp_difference/max": 1.5}
    )
    assert "vllm_importance_sampling_correction: true" in finding.action and "every_n_steps: 1" in finding.action
    corrected = C.engine_logprob_mismatch(h, RunInfo(step=5, settings={"vllm_importance_sampling_correction": True}))
    assert "vllm_importance_sampling_cap" in corrected.action and "every_n_steps: 1" in corrected.action
    assert C.engine_logprob_mismatch(history(train__sampling__sampling_logp_difference__mean=[0.001] * 5), INFO) is None


def test_likelihood_displacement():
    """Chosen log-prob -5 -> -15 (a drop of 10 >= 5 nats) while margins grow 0.5 -> 3."""
    h = history(train__logps__chosen=[-5.0] * 10 + [-15.0] * 10, train__rewards__margins=[0.5] * 10 + [3.0] * 10)
    finding = C.likelihood_displacement(h, INFO)
    assert finding.code == "likelihood-displacement" and finding.area == "preference"
    assert finding.evidence == pytest.approx(
        {"logps/chosen_start": -5.0, "logps/chosen": -15.0, "margins_start": 0.5, "margins": 3.0}
    )
    assert "by 10 nats" in finding.message and "sft" in finding.action
    rising = history(train__logps__chosen=[-5.0] * 10 + [-4.0] * 10, train__rewards__margins=[0.5] * 10 + [3.0] * 10)
    assert C.likelihood_displacement(rising, INFO) is None


def test_accuracy_saturated_early():
    """Accuracy 1.0 for 10 logged steps at step 100 of 1000 (10% < 20% of the run); late saturation is fine."""
    h = history(train__rewards__accuracies=[1.0] * 10, eval__rewards__accuracies=[0.7])
    finding = C.accuracy_saturated_early(h, INFO)
    assert finding.code == "accuracy-saturated-early"
    assert finding.evidence == pytest.approx(
        {"rewards/accuracies": 1.0, "progress": 0.1, "eval/rewards/accuracies": 0.7}
    )
    assert "held-out accuracy is 0.7" in finding.message and "raise beta" in finding.action
    assert C.accuracy_saturated_early(h, RunInfo(step=800, max_steps=1000)) is None


def test_margin_explosion():
    """Margins average 12 >= 10 over the last 5 logged steps."""
    h = history(train__rewards__margins=[11.0, 11.0, 12.0, 13.0, 13.0])
    finding = C.margin_explosion(h, RunInfo(step=5, settings={"beta": 0.1}))
    assert finding.code == "margin-explosion"
    assert finding.evidence == pytest.approx({"rewards/margins": 12.0, "beta": 0.1})
    assert "ipo" in finding.action and "raise beta" in finding.action
    assert C.margin_explosion(history(train__rewards__margins=[2.0] * 5), INFO) is None


def test_nonfinite_loss():
    h = history(train__loss=[1.0, 0.9, math.nan])
    finding = C.nonfinite_loss(h, INFO)
    assert finding.code == "nonfinite-loss" and finding.severity == "critical"
    assert "train/loss is nan at step 2" in finding.message and "gradient_clip_val" in finding.action
    assert C.nonfinite_loss(history(train__loss=[1.0, math.inf]), INFO).evidence["loss"] == math.inf
    assert C.nonfinite_loss(history(train__loss=[1.0, 0.9]), INFO) is None


def test_grad_norm_spike():
    """Norms of 1.0 for 10 steps then 50: 50x the median 1.0 (>= 10x, and above the 10.0 floor). Once raised, it
    clears only after 5 calm steps (each < 3x the median). With clipping on, one spike is bounded by the clip and
    is not reported; three within the window are."""
    h = history(train__grad_norm=[1.0] * 10 + [50.0])
    finding = C.grad_norm_spike(h, INFO)
    assert finding.code == "grad-norm-spike"
    assert finding.evidence["grad_norm"] == 50.0 and finding.evidence["median_grad_norm"] == 1.0
    assert finding.evidence["spikes"] == 1
    assert "50x the median" in finding.message and "gradient_clip_val" in finding.action
    after_two = history(train__grad_norm=[1.0] * 10 + [50.0, 1.0, 1.0])
    assert C.grad_norm_spike(after_two, INFO) is None  # not a new spike
    assert C.grad_norm_spike(after_two, INFO, active=True) is not None  # but still within the calm period
    calm = history(train__grad_norm=[1.0] * 10 + [50.0] + [1.0] * 5)
    assert C.grad_norm_spike(calm, INFO, active=True) is None
    assert C.grad_norm_spike(history(train__grad_norm=[1.0, 1.2, 0.9, 1.1, 1.0, 2.0]), INFO) is None
    # RL steps with near-zero gradients (all-equal groups) then one of ordinary size: 30000x the median, not a spike.
    assert C.grad_norm_spike(history(train__grad_norm=[1e-4] * 10 + [3.0]), INFO) is None
    assert C.grad_norm_spike(history(train__grad_norm=[1e-4] * 10 + [3.0]), INFO, min_grad_norm=1.0) is not None

    clipped = RunInfo(step=10, gradient_clip_val=1.0)
    assert C.grad_norm_spike(h, clipped) is None  # one clipped spike: its update was bounded
    recurring = history(train__grad_norm=[1.0] * 10 + [50.0, 1.0, 40.0, 1.0, 60.0])
    finding = C.grad_norm_spike(recurring, clipped)
    assert finding.evidence["spikes"] == 3 and finding.evidence["grad_norm"] == 60.0
    assert finding.action.startswith("Spikes keep coming although gradients are clipped")


def test_plateau():
    """Loss 2.0 for 60 logged steps at full learning rate: 0% change between the two windows of 30 (< 1%). During
    the schedule's annealing (lr at 5% of its peak), or with the reward solved, the check stays quiet."""
    h = history(train__loss=[2.0] * 60)
    finding = C.plateau(h, INFO)
    assert finding.code == "plateau" and finding.evidence["relative_change"] == 0.0
    assert "train/loss moved 0.00%" in finding.message and "Raise the learning rate" in finding.action
    assert C.plateau(h, RunInfo(step=100, lr_ratio=0.05)) is None
    solved = history(train__reward=[1.0] * 60, train__frac_reward_zero_std=[1.0] * 60)
    assert C.plateau(solved, INFO) is None
    assert C.plateau(history(train__loss=[2.0] * 30 + [1.5] * 30), INFO) is None


def test_overfitting():
    """eval/loss 1.0 -> 1.1 -> 1.2 at three validations (+20% >= 2%) while train/loss falls 1.0 -> 0.5."""
    h = History()
    for step, value in zip((100, 200, 300), (1.0, 1.1, 1.2)):
        h.add(step, {"eval/loss": value})
    for step in range(100, 301, 10):
        h.add(step, {"train/loss": 1.0 - 0.5 * (step - 100) / 200})
    finding = C.overfitting(h, INFO)
    assert finding.code == "overfitting"
    assert finding.evidence == pytest.approx({"eval_loss_first": 1.0, "eval_loss": 1.2, "relative_rise": 0.2})
    assert "1 -> 1.1 -> 1.2" in finding.message and "EarlyStopping" in finding.action
    improving = History()
    for step, value in zip((100, 200, 300), (1.2, 1.1, 1.0)):
        improving.add(step, {"eval/loss": value})
    assert C.overfitting(improving, INFO) is None
    unstable = History()  # both losses rise together: instability, not overfitting
    for step, value in zip((100, 200, 300), (1.0, 1.1, 1.2)):
        unstable.add(step, {"eval/loss": value, "train/loss": value - 0.2})
    assert C.overfitting(unstable, INFO) is None


def test_padding_waste():
    h = history(train__padding_fraction=[0.55] * 5)
    finding = C.padding_waste(h, INFO)
    assert finding.code == "padding-waste" and finding.evidence == pytest.approx({"padding_fraction": 0.55})
    assert "55% of the tokens" in finding.message and "padding_free: true" in finding.action
    assert C.padding_waste(history(train__padding_fraction=[0.05] * 5), INFO) is None


def test_generation_bound():
    """Generation 0.8 s of a 1.0 s step: 80% >= 70%; the advice depends on the engine."""
    h = history(train__timing__generation_s=[0.8] * 5, timing__step_s=[1.0] * 5)
    finding = C.generation_bound(h, INFO)
    assert finding.code == "generation-bound" and finding.evidence["generation_share"] == pytest.approx(0.8)
    assert "use_vllm: true" in finding.action
    assert "vllm_gpu_memory_utilization" in C.generation_bound(h, RunInfo(step=5, settings={"use_vllm": True})).action
    assert C.generation_bound(history(train__timing__generation_s=[0.2] * 5, timing__step_s=[1.0] * 5), INFO) is None


def test_low_gpu_memory():
    """Peak 10% of the device on CUDA: below 25%. Not a question on CPU."""
    h = history(system__gpu_memory_fraction=[0.08, 0.1, 0.1, 0.09, 0.1])
    finding = C.low_gpu_memory(h, RunInfo(step=5, accelerator="cuda"))
    assert finding.code == "low-gpu-memory" and finding.evidence == pytest.approx({"gpu_memory_fraction": 0.1})
    assert "Raise the batch size" in finding.action
    assert C.low_gpu_memory(h, RunInfo(step=5, accelerator="cpu")) is None
    assert C.low_gpu_memory(history(system__gpu_memory_fraction=[0.8] * 5), RunInfo(step=5, accelerator="cuda")) is None


def test_dataloader_starvation():
    """Waiting 0.5 s for each batch of a 0.5 s step: half of each iteration (>= 30%)."""
    h = history(timing__data_wait_s=[0.5] * 5, timing__step_s=[0.5] * 5)
    finding = C.dataloader_starvation(h, INFO)
    assert finding.code == "dataloader-starvation" and finding.evidence["data_wait_share"] == pytest.approx(0.5)
    assert "num_workers" in finding.action
    assert C.dataloader_starvation(history(timing__data_wait_s=[0.01] * 5, timing__step_s=[0.5] * 5), INFO) is None


def test_every_check_has_a_scripted_test():
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    assert set(CHECKS) <= tested


# -- the monitor: hysteresis, rate limit, configuration, state ------------------------------------------------------


def test_hysteresis_says_raised_once_and_recovered_once():
    """frac_reward_zero_std hovers between the clear (0.7) and trigger (0.9) levels after raising: one record for
    the whole stretch, and one when it falls below 0.7; no check fires on the way."""
    monitor = HealthMonitor(disable=["plateau"])
    values = [0.95] * 10 + [0.8, 0.85, 0.75, 0.88, 0.8] * 4 + [0.1] * 10
    statuses = []
    for step, value in enumerate(values):
        events = monitor.update(step, {"train/frac_reward_zero_std": value}, RunInfo(step=step))
        statuses += [(event.status, event.finding.code, step) for event in events]
    raised_at = 9  # the first full window of 10 values at 0.95
    assert statuses[0] == ("raised", "reward-std-collapse", raised_at)
    assert [s[:2] for s in statuses] == [("raised", "reward-std-collapse"), ("recovered", "reward-std-collapse")]
    assert monitor.counts == {"reward-std-collapse": 1} and not monitor.active
    record = monitor.events[1].record()
    assert record["status"] == "recovered" and record["severity"] == "info" and record["action"] is None


def test_unknown_check_code_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown health check\(s\) \['reward-std'\]; the checks are: reward-std"):
        HealthMonitor(thresholds={"reward-std": {"frac_zero_std": 0.5}})
    with pytest.raises(ValueError, match="Unknown health check"):
        TrainingHealth(disable=["plateaux"])


def test_thresholds_override_the_defaults():
    monitor = HealthMonitor(thresholds={"padding-waste": {"fraction": 0.6}})
    for step in range(5):
        assert not monitor.update(step, {"train/padding_fraction": 0.5}, RunInfo(step=step))
    monitor = HealthMonitor()
    events = [monitor.update(step, {"train/padding_fraction": 0.5}, RunInfo(step=step)) for step in range(5)]
    assert [e.finding.code for e in events[-1]] == ["padding-waste"]


def test_monitor_state_round_trip_continues_exactly():
    """A monitor restored from its state_dict mid-condition behaves like the one that never stopped."""
    values = [0.95] * 12 + [0.1] * 12
    straight = HealthMonitor()
    for step, value in enumerate(values):
        straight.update(step, {"train/frac_reward_zero_std": value}, RunInfo(step=step))
    first = HealthMonitor()
    for step, value in enumerate(values[:12]):
        first.update(step, {"train/frac_reward_zero_std": value}, RunInfo(step=step))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds survives serialization
    resumed = HealthMonitor()
    resumed.load_state_dict(state)
    assert set(resumed.active) == {"reward-std-collapse"}
    later = []
    for step, value in enumerate(values[12:], start=12):
        later += resumed.update(step, {"train/frac_reward_zero_std": value}, RunInfo(step=step))
    assert [(e.status, e.step) for e in later] == [(e.status, e.step) for e in straight.events if e.step >= 12]
    assert resumed.counts == straight.counts


# -- real tiny runs ---------------------------------------------------------------------------------------------------


def health_of(trainer) -> TrainingHealth:
    """The TrainingHealth the module added through configure_callbacks (it is on by default)."""
    (callback,) = [c for c in trainer.callbacks if isinstance(c, TrainingHealth)]
    return callback


def raised(callback: TrainingHealth) -> dict[str, dict]:
    """The first 'raised' record of each code, from the callback's health.jsonl (what programs read)."""
    path = Path(callback.path)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    assert records == callback.records
    first = {}
    for record in records:
        if record["status"] == "raised":
            first.setdefault(record["code"], record)
    return first


def online_fit(tmp_path, steps: int, module, prompts_per_step: int = 4, logger=False):
    seed_everything(0)
    trainer = cpu_trainer(tmp_path, max_steps=steps, log_every_n_steps=1, limit_val_batches=0, logger=logger)
    trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=prompts_per_step, max_train_samples=400))
    return health_of(trainer)


def constant_reward(prompts, completions, **columns) -> list[float]:
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def constant_reward_run(tmp_path_factory):
    """GRPO on a reward that is 1 for every completion, from the random tiny model (which never writes the end of
    turn within 6 tokens), logged to TensorBoard like a user's run."""
    root = tmp_path_factory.mktemp("constant-reward")
    module = GRPOModule(reward_funcs=[constant_reward], num_generations=4, max_completion_length=6)
    callback = online_fit(root, 14, module, logger=TensorBoardLogger(str(root), name="run"))
    return root, callback


@pytest.mark.slow
def test_constant_reward_collapses_the_group_std_and_truncation_is_reported(constant_reward_run):
    _, callback = constant_reward_run
    findings = raised(callback)
    assert set(findings) == {"reward-std-collapse", "completions-truncated"}
    collapse = findings["reward-std-collapse"]
    assert collapse["step"] == 9 and collapse["severity"] == "warning" and collapse["area"] == "rl-signal"
    assert collapse["evidence"]["frac_reward_zero_std"] == 1.0 and collapse["evidence"]["reward_std"] == 0.0
    assert "num_generations" in collapse["action"]
    truncated = findings["completions-truncated"]
    assert truncated["evidence"]["completions/clipped_ratio"] >= 0.9  # the random model rarely ends a turn
    assert "max_completion_length=6" in truncated["message"] and "soft_overlong_penalty" in truncated["action"]
    assert Path(callback.path).parent.name == "version_0"  # in the run's log dir, beside the events


@pytest.mark.slow
def test_doctor_reports_the_constant_reward_run(constant_reward_run):
    """The report command on a real run: text, JSON (for programs) and the PNG with the findings marked."""
    root, _ = constant_reward_run
    command = [sys.executable, "-m", "ltpost.doctor", str(root / "run")]
    text = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "ltpost doctor:" in out and "last step 13" in out and "2 findings (health.jsonl)" in out
    assert "RL signal            PROBLEM" in out and "train/frac_reward_zero_std 1 -> 1" in out
    assert "step      9  WARNING reward-std-collapse: group reward std is 0 over the last 10" in out
    png = root / "run" / "version_0" / "doctor.png"
    assert f"curves: {png}" in out

    report = json.loads(
        subprocess.run([*command, "--json", "--no-png"], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    )
    assert report["open"] == ["completions-truncated", "reward-std-collapse"]
    assert report["areas"]["rl-signal"]["status"] == "problem"
    assert report["areas"]["rl-signal"]["findings"] == ["reward-std-collapse at step 9"]
    assert report["model"] == "ltpost.GRPOModule" or report["model"] is None
    assert [r["code"] for r in report["findings"]] == ["completions-truncated", "reward-std-collapse"] or [
        r["code"] for r in report["findings"]
    ] == ["reward-std-collapse", "completions-truncated"]

    import matplotlib.image

    image = matplotlib.image.imread(png)  # a real PNG with the curves: 12 x 3.2-per-row inches at 100 dpi
    assert image.shape[1] == 1200 and image.shape[0] >= 320
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_doctor_replays_a_run_without_health_jsonl(constant_reward_run, tmp_path):
    """The callback was off (or the file deleted): the report replays the logged curves through the same checks."""
    import shutil

    root, _ = constant_reward_run
    copy = tmp_path / "run"
    shutil.copytree(root / "run" / "version_0", copy)
    (copy / "health.jsonl").unlink()
    (copy / "doctor.png").unlink(missing_ok=True)
    from ltpost.doctor import diagnose

    report = diagnose(copy)
    assert report["findings_source"].startswith("replayed")
    assert {r["code"] for r in report["findings"] if r["status"] == "raised"} >= {"reward-std-collapse"}


def test_doctor_on_a_missing_folder_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ltpost.doctor", str(tmp_path / "nope"), "--no-png"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "ltpost doctor:" in result.stderr and "nope" in result.stderr


@pytest.mark.slow
def test_a_huge_learning_rate_clips_most_tokens_and_blows_up_the_kl(tmp_path):
    """lr 3e-2 with two passes over each rollout: the second pass's ratios leave the clip range, and the policy
    runs from the reference (beta 0.1)."""
    module = GRPOModule(
        reward_funcs=[even_token_reward],
        num_generations=4,
        max_completion_length=6,
        learning_rate=3e-2,
        num_iterations=2,
        beta=0.1,
        lr_scheduler_type="constant",
    )
    findings = raised(online_fit(tmp_path, 24, module))
    assert {"clip-ratio-high", "kl-blowup"} <= set(findings)
    clip = findings["clip-ratio-high"]
    assert clip["evidence"]["clip_ratio/region_mean"] >= 0.2 and clip["evidence"]["learning_rate"] == 3e-2
    assert clip["action"].startswith("Lower the learning rate")
    kl = findings["kl-blowup"]
    assert kl["evidence"]["kl"] >= 0.5 and kl["evidence"]["kl_first"] < 0.05 and kl["evidence"]["beta"] == 0.1


@pytest.mark.slow
def test_a_policy_rewarded_for_even_tokens_collapses_its_entropy(tmp_path):
    module = GRPOModule(
        reward_funcs=[even_token_reward],
        num_generations=8,
        max_completion_length=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    findings = raised(online_fit(tmp_path, 30, module))
    collapse = findings["entropy-collapse"]
    assert collapse["evidence"]["entropy"] < 0.1 * collapse["evidence"]["entropy_start"]
    assert "Raise temperature" in collapse["action"]


def distinct_tokens(prompts, completions, completion_ids, **columns) -> list[float]:
    return [len(set(ids)) / 8 for ids in completion_ids]


@pytest.mark.slow
def test_a_reward_for_distinct_tokens_explodes_the_entropy(tmp_path):
    """From the SFT checkpoint (confident, low entropy), paying for distinct tokens drives the policy to noise."""
    module = GRPOModule(
        "ltpost:tiny-llama-sft",
        reward_funcs=[distinct_tokens],
        num_generations=8,
        max_completion_length=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
    )
    findings = raised(online_fit(tmp_path, 12, module, prompts_per_step=2))  # measured: raised at step 9
    explosion = findings["entropy-explosion"]
    assert explosion["evidence"]["entropy"] >= 2 * explosion["evidence"]["entropy_start"]


def longer_is_better(prompts, completions, completion_ids, **columns) -> list[float]:
    return [len(ids) / 24 for ids in completion_ids]


@pytest.mark.slow
def test_a_reward_that_pays_for_length_is_reported_as_length_hacking(tmp_path):
    module = GRPOModule(
        "ltpost:tiny-llama-sft",
        reward_funcs=[longer_is_better],
        num_generations=8,
        max_completion_length=24,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
    )
    findings = raised(online_fit(tmp_path, 22, module, prompts_per_step=2))  # measured: raised at step 19
    hacking = findings["length-hacking"]
    evidence = hacking["evidence"]
    assert (
        evidence["mean_length"] >= 1.5 * evidence["mean_length_start"] and evidence["reward"] > evidence["reward_start"]
    )
    assert "length penalty" in hacking["action"]


@pytest.mark.slow
def test_long_generations_make_the_step_generation_bound(tmp_path):
    """Two completions of 64 tokens for one prompt: token-by-token sampling dominates a one-row training step."""
    module = GRPOModule(reward_funcs=[even_token_reward], num_generations=2, max_completion_length=64)
    findings = raised(online_fit(tmp_path, 12, module, prompts_per_step=1))
    bound = findings["generation-bound"]
    assert bound["evidence"]["generation_share"] >= 0.7 and "use_vllm: true" in bound["action"]


class StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


@pytest.mark.slow
def test_dpo_on_sixteen_pairs_saturates_early_and_displaces_the_chosen_likelihood(tmp_path):
    """DPO at lr 1e-3 on 16 pairs (the same batch every step), planned for 200 steps, stopped at 40: every pair is
    ranked right by ~step 15 (at 8% of the run), and the chosen responses' log-probs fall while margins grow
    (measured: mean over the first 10 steps -4.9, over steps 30-39 -10.3, margins 0.5 -> 3.6)."""
    seed_everything(0)
    module = DPOModule("ltpost:tiny-llama-sft", beta=0.1, learning_rate=1e-3, lr_scheduler_type="constant")
    data = PreferenceDataModule(batch_size=16, max_length=128, eval_split=None, max_train_samples=16)
    trainer = cpu_trainer(tmp_path, max_steps=200, log_every_n_steps=1, callbacks=[StopAfter(40)])
    trainer.fit(module, datamodule=data)
    findings = raised(health_of(trainer))
    saturated = findings["accuracy-saturated-early"]
    assert saturated["evidence"]["rewards/accuracies"] == 1.0 and saturated["evidence"]["progress"] <= 0.2
    displaced = findings["likelihood-displacement"]
    evidence = displaced["evidence"]
    assert evidence["logps/chosen"] < evidence["logps/chosen_start"] - 5
    assert evidence["margins"] > evidence["margins_start"]
    assert "sft" in displaced["action"]


class NaNAt(SFTModule):
    """An SFT module whose loss is NaN at one optimizer step (a bad batch, an overflow)."""

    def __init__(self, nan_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == self.nan_at:
            out["loss"] = out["loss"] * math.nan
        return out


class Snapshots(Callback):
    """The weights after each optimizer step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_with_a_checkpoint_that_resumes(tmp_path):
    """The loss is NaN at step 5: the update is skipped, a checkpoint with the weights of step 4 is written, the run
    stops; resuming from it (the cause fixed) runs to max_steps, and the resumed callback says once that the loss
    is finite again."""
    seed_everything(0)
    data = SFTDataModule(batch_size=8, max_length=64, eval_split=None, max_train_samples=200)
    snapshots = Snapshots()
    trainer = cpu_trainer(tmp_path, max_steps=12, log_every_n_steps=1, callbacks=[snapshots])
    trainer.fit(NaNAt(nan_at=5, learning_rate=1e-3), datamodule=data)
    callback = health_of(trainer)
    assert trainer.global_step == 6 and trainer.should_stop  # step 5 ran (without an update), then the run stopped
    checkpoint = Path(callback.last_checkpoint)
    assert checkpoint.name == "before-nonfinite-loss-step=5.ckpt" and checkpoint.exists()
    record = raised(callback)["nonfinite-loss"]
    assert record["severity"] == "critical" and record["step"] == 5 and "--ckpt_path" in record["action"]
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    for name, value in snapshots.weights[5].items():  # after step 4's update: step 5 left them untouched
        assert torch.equal(saved[f"model.{name}"], value), name
        assert torch.isfinite(value).all(), name

    resumed = cpu_trainer(tmp_path / "resumed", max_steps=12, log_every_n_steps=1)
    resumed.fit(NaNAt(nan_at=None, learning_rate=1e-3), datamodule=data, ckpt_path=str(checkpoint))
    assert resumed.global_step == 12
    records = health_of(resumed).records
    assert [(r["code"], r["status"]) for r in records if r["code"] == "nonfinite-loss"] == [
        ("nonfinite-loss", "recovered")
    ]
    assert math.isfinite(float(resumed.callback_metrics["train/loss"]))


class SpikeAt(SFTModule):
    """An SFT module whose loss (and so its gradient) is scaled up 1000x at one step."""

    def __init__(self, spike_at: int = 15, **kwargs):
        super().__init__(**kwargs)
        self.spike_at = spike_at

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == self.spike_at:
            out["loss"] = out["loss"] * 1000.0
        return out


@pytest.mark.slow
def test_a_gradient_spike_is_reported_once(tmp_path):
    seed_everything(0)
    data = SFTDataModule(batch_size=8, max_length=64, eval_split=None, max_train_samples=400)
    trainer = cpu_trainer(tmp_path, max_steps=24, log_every_n_steps=1)
    trainer.fit(SpikeAt(spike_at=15, learning_rate=1e-4), datamodule=data)
    callback = health_of(trainer)
    spike = raised(callback)["grad-norm-spike"]
    assert spike["step"] == 15 and spike["evidence"]["grad_norm"] > 100 * spike["evidence"]["median_grad_norm"]
    statuses = [(r["status"], r["step"]) for r in callback.records if r["code"] == "grad-norm-spike"]
    assert statuses == [("raised", 15), ("recovered", 20)]  # once, and recovered after 5 calm steps


@pytest.mark.slow
def test_sft_at_learning_rate_zero_plateaus(tmp_path):
    """lr 0 (constant): nothing moves, so 60 logged losses average the same over the last two windows of 30."""
    seed_everything(0)
    data = SFTDataModule(batch_size=8, max_length=64, eval_split=None, max_train_samples=64)
    trainer = cpu_trainer(tmp_path, max_steps=64, log_every_n_steps=1)
    trainer.fit(SFTModule(learning_rate=0.0, lr_scheduler_type="constant"), datamodule=data)
    plateau = raised(health_of(trainer))["plateau"]
    assert plateau["evidence"]["relative_change"] < 0.01 and plateau["step"] == 59


@pytest.mark.slow
def test_sft_on_sixteen_rows_overfits(tmp_path):
    """16 training rows, lr 3e-3, validation every 10 steps on held-out sums: the held-out loss turns up while the
    training loss keeps falling."""
    seed_everything(0)
    data = SFTDataModule(batch_size=16, max_length=64, max_train_samples=16, max_eval_samples=64)
    trainer = cpu_trainer(
        tmp_path, max_steps=120, log_every_n_steps=5, val_check_interval=10, check_val_every_n_epoch=None
    )
    trainer.fit(SFTModule(learning_rate=3e-3, lr_scheduler_type="constant"), datamodule=data)
    overfit = raised(health_of(trainer))["overfitting"]
    assert overfit["evidence"]["eval_loss"] > overfit["evidence"]["eval_loss_first"]
    assert "EarlyStopping" in overfit["action"]


@pytest.mark.slow
def test_padded_batches_are_reported_as_padding_waste(tmp_path):
    """padding_free off and widths rounded up to 64 tokens: the ~20-token rows leave most of each batch padding."""
    seed_everything(0)
    data = SFTDataModule(
        batch_size=8, max_length=64, eval_split=None, padding_free=False, pad_to_multiple_of=64, max_train_samples=64
    )
    trainer = cpu_trainer(tmp_path, max_steps=6, log_every_n_steps=1)
    trainer.fit(SFTModule(), datamodule=data)
    waste = raised(health_of(trainer))["padding-waste"]
    assert waste["evidence"]["padding_fraction"] > 0.5 and "padding_free: true" in waste["action"]
    assert waste["step"] == 4  # the first full window of 5 logged steps


class SlowData(SFTDataModule):
    """A data module whose collate sleeps 1 s per batch (tokenizing or augmenting on the fly, say): far longer than
    a tiny-model step even on a loaded machine."""

    def collate(self, examples):
        time.sleep(1.0)
        return super().collate(examples)


@pytest.mark.slow
def test_a_slow_collate_starves_the_step(tmp_path):
    seed_everything(0)
    data = SlowData(batch_size=4, max_length=64, eval_split=None, max_train_samples=64)
    trainer = cpu_trainer(tmp_path, max_steps=8, log_every_n_steps=1)
    trainer.fit(SFTModule(), datamodule=data)
    starving = raised(health_of(trainer))["dataloader-starvation"]
    assert starving["evidence"]["data_wait_s"] >= 1.0 and starving["evidence"]["data_wait_share"] >= 0.3
    assert "num_workers" in starving["action"]


def test_training_health_false_adds_no_callback(tmp_path):
    data = SFTDataModule(batch_size=4, max_length=64, eval_split=None, max_train_samples=8)
    trainer = cpu_trainer(tmp_path, max_steps=1)
    trainer.fit(SFTModule(training_health=False), datamodule=data)
    assert not [c for c in trainer.callbacks if isinstance(c, TrainingHealth)]


def test_a_configured_callback_replaces_the_default(tmp_path):
    """The user's TrainingHealth (its thresholds) is the one that runs; the module does not add a second."""
    mine = TrainingHealth(thresholds={"padding-waste": {"fraction": 0.99}}, verbose=False)
    data = SFTDataModule(batch_size=4, max_length=64, eval_split=None, max_train_samples=8)
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[mine])
    trainer.fit(SFTModule(), datamodule=data)
    assert health_of(trainer) is mine
    assert mine.monitor.thresholds == {"padding-waste": {"fraction": 0.99}}


def test_thresholds_and_disable_from_yaml(tmp_path, monkeypatch):
    """The README's YAML: a configured TrainingHealth with thresholds and disabled checks builds through the CLI."""
    from ltpost.cli import LtpostCLI

    config = tmp_path / "health.yaml"
    config.write_text(
        """
trainer:
  max_steps: 1
  callbacks:
    - class_path: ltpost.TrainingHealth
      init_args:
        thresholds: {reward-std-collapse: {frac_zero_std: 0.95}, grad-norm-spike: {min_grad_norm: 1.0}}
        disable: [plateau]
model:
  class_path: ltpost.SFTModule
data:
  class_path: ltpost.SFTDataModule
"""
    )
    monkeypatch.chdir(tmp_path)
    cli = LtpostCLI(args=["--config", str(config)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TrainingHealth)]
    assert callback.monitor.thresholds == {
        "reward-std-collapse": {"frac_zero_std": 0.95},
        "grad-norm-spike": {"min_grad_norm": 1.0},
    }
    assert callback.monitor.disable == {"plateau"}
