"""What ``bench/compare.py`` runs in its worker processes, apart from TRL (``bench/sides_trl.py``).

One method's work is defined once, here, from the constants of the per-method benchmarks (``sft_step.py``,
``preference_step.py``, ``online_step.py``): the model, the rows and their order, the batch size, the lengths and
the hyperparameters. Every side (ltpost, the raw loop, TRL) reads them from here.

- ``ltpost_solo``: ``Trainer.fit`` on the method's ltpost module and datamodule with ltpost's defaults
  (padding-free batches, no wasted forwards), alone in its process, so the process's peak RSS is its own.
- ``lockstep``: ltpost and the raw PyTorch loop in the same process, step by step, through the per-method
  benchmark's own machinery (bit-identical losses checked there); gives the paired ltpost / raw ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import tempfile

import torch
from benchlib import CLOCKS, clock

METHODS = ("sft", "dpo", "reward", "grpo", "rloo")
ONLINE = ("grpo", "rloo")
SEED = 0
# Per method: steps and warm-up steps of a full run; batch size (rows, pairs or prompts per step).
STEPS = {"sft": (40, 5), "dpo": (24, 4), "reward": (24, 4), "grpo": (10, 2), "rloo": (10, 2)}
QUICK_STEPS = (2, 0)  # a smoke test: both steps counted
BATCH_SIZE = 16
NUM_GENERATIONS = 8
MAX_COMPLETION_LENGTH = 8


def steps_for(method: str, quick: bool) -> tuple[int, int]:
    return QUICK_STEPS if quick else STEPS[method]


def configure(quick: bool) -> None:
    """``--quick`` (a smoke test, not a measurement) shrinks the work: 4 rows / pairs / prompts x 4 generations."""
    global BATCH_SIZE, NUM_GENERATIONS
    BATCH_SIZE, NUM_GENERATIONS = (4, 4) if quick else (16, 8)


# -- measuring ------------------------------------------------------------------------------------------------


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux ``/proc``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """The process's high-water resident set size so far, MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Recorder:
    """Per-step timings and token counts of one training run, the same probes on every side.

    ``begin``/``end`` bracket one optimizer step (the framework's own step hooks: data loading is outside on every
    side). ``count_forward`` is a forward pre-hook on the trainable model: it adds the non-padding tokens of every
    forward that runs with autograd on (the training forwards; generation, reference and old-policy forwards run
    without), counted from the inputs the model actually received (``attention_mask.sum()`` where a mask is
    given, else every position: padding-free rows carry none). ``timed`` accumulates a phase (generation,
    generate-and-score) within the step.
    """

    def __init__(self) -> None:
        self.step_s = {c: [] for c in CLOCKS}
        self.generation_s = {c: [] for c in CLOCKS}
        self.scoring_s = {c: [] for c in CLOCKS}
        self.fed_tokens: list[int] = []  # non-padding tokens into training forwards, per step
        self.sequence_tokens: list[int] = []  # online: prompt + completion tokens of every completion, per step
        self.generated_tokens: list[int] = []  # online: completion tokens, per step
        self.losses: list[float] = []
        self._losses: list[torch.Tensor] = []
        self._buckets: dict[str, list[float]] = {}
        self._fed = 0
        self._start = None
        self._in_step = False

    def begin(self) -> None:
        self._buckets = {"generation": [0.0, 0.0], "generate_and_score": [0.0, 0.0]}
        self._fed, self._seq, self._gen = 0, 0, 0
        self._in_step = True
        self._start = clock()

    def end(self, loss: torch.Tensor | None = None) -> None:
        end = clock()
        self._in_step = False
        for i, c in enumerate(CLOCKS):
            generation = self._buckets["generation"][i]
            self.step_s[c].append(end[i] - self._start[i])
            self.generation_s[c].append(generation)
            self.scoring_s[c].append(self._buckets["generate_and_score"][i] - generation)
        self.fed_tokens.append(self._fed)
        self.sequence_tokens.append(self._seq)
        self.generated_tokens.append(self._gen)
        if loss is not None:
            self._losses.append(loss.detach())

    def add_rollout(self, sequence_tokens: int, generated_tokens: int) -> None:
        self._seq += sequence_tokens
        self._gen += generated_tokens

    def count_forward(self, module, args, kwargs) -> None:
        if not (self._in_step and torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:  # padded batch: [B, T] ones on the real tokens
            self._fed += int(mask.sum())  # host int; a no-op sync on CPU
        else:  # padding-free, or a 4D block mask (ltpost's shared-prompt rows): every position is fed
            self._fed += ids.numel()

    def watch(self, model: torch.nn.Module, method: str) -> None:
        """Count the training forwards of ``model``: for the reward model its backbone, which ltpost calls directly
        (it reads the score head at each sequence's end itself) and TRL through the classifier."""
        target = model.base_model if method == "reward" else model
        target.register_forward_pre_hook(self.count_forward, with_kwargs=True)

    def timed(self, bucket: str, fn):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                end = clock()
                total = self._buckets[bucket]
                total[0] += end[0] - start[0]
                total[1] += end[1] - start[1]

        return wrapper

    def result(self, **extra) -> dict:
        self.losses = [float(loss) for loss in self._losses]
        return {
            "step_s": self.step_s,
            "generation_s": self.generation_s,
            "scoring_s": self.scoring_s,
            "fed_tokens": self.fed_tokens,
            "sequence_tokens": self.sequence_tokens,
            "generated_tokens": self.generated_tokens,
            "losses": self.losses,
            **extra,
        }


# -- the work, defined once -----------------------------------------------------------------------------------


def online_args(method: str, steps: int, warmup: int, threads: int) -> argparse.Namespace:
    """``online_step``'s namespace for one method's pair (one round, no untimed warm-up round)."""
    import online_step

    args = online_step.parse_args(
        [
            *("--steps", str(steps), "--warmup", str(warmup), "--rounds", "1", "--threads", str(threads)),
            *("--batch-size", str(BATCH_SIZE), "--num-generations", str(NUM_GENERATIONS)),
            *("--max-completion-length", str(MAX_COMPLETION_LENGTH), "--pairs", method),
            *("--output", os.devnull),
        ]
    )
    args.quick, args.output = True, None  # quick: skips online_step's untimed warm-up round (steps stay as given)
    return args


def ltpost_module_and_data(method: str, steps: int, warmup: int, threads: int):
    """The ltpost module and datamodule of one method, as the per-method benchmark builds them (its constants)."""
    if method == "sft":
        import sft_step

        from ltpost import SFTModule

        return SFTModule(**sft_step.MODULE_KWARGS), sft_step.make_data(BATCH_SIZE, steps)(True)
    if method in ("dpo", "reward"):
        import preference_step

        from ltpost import DPOModule, RewardModule

        datamodule = preference_step.make_data(BATCH_SIZE, steps)[True]
        if method == "dpo":
            return DPOModule(**preference_step.DPO_KWARGS), datamodule  # reference: auto = precompute
        return RewardModule(**preference_step.REWARD_KWARGS), datamodule
    import online_step

    args = online_args(method, steps, warmup, threads)
    variant = next(v for v in online_step.ALL_VARIANTS if v.pair == method and v.lightning)
    module = online_step.module_class(variant)(**online_step.module_kwargs(variant, args))
    return module, online_step.make_data(args, steps)()


# -- ltpost alone ---------------------------------------------------------------------------------------------


def ltpost_solo(method: str, steps: int, warmup: int, threads: int, log_dir: str) -> dict:
    """ltpost's defaults through ``Trainer.fit``, probed by a callback; peak RSS read right after the fit."""
    from lightning.pytorch import Callback, Trainer

    module, datamodule = ltpost_module_and_data(method, steps, warmup, threads)
    base_rss = rss_mib()
    recorder = Recorder()
    info = {}

    class Probe(Callback):
        instrumented = False

        def setup(self, trainer, pl_module, stage):
            torch.manual_seed(SEED)  # configure_model runs right after the setup hooks: the raw loop's init

        def on_train_start(self, trainer, pl_module):
            info["initial_weights"] = weights_digest(pl_module.model)
            recorder.watch(pl_module.model, method)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if method in ONLINE and not self.instrumented:  # the engine exists once fit has started
                self.instrumented = True
                engine = pl_module.rollout_engine
                engine.generate = recorder.timed("generation", engine.generate)
                generate_and_score = pl_module.generate_and_score

                def scored(*args, **kwargs):
                    result = generate_and_score(*args, **kwargs)
                    completions = result.rollout.completion_ids
                    prompt_tokens = sum(len(ids) for ids in result.prompt_ids)
                    generated = sum(len(ids) for ids in completions)
                    recorder.add_rollout(prompt_tokens + generated, generated)
                    return result

                pl_module.generate_and_score = recorder.timed("generate_and_score", scored)
            torch.manual_seed(SEED + batch_idx)  # online_step's per-step seed
            recorder.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.end(outputs["loss"])
            if method not in ONLINE:
                recorder.sequence_tokens[-1] = int(batch["num_tokens"])

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        log_every_n_steps=50,
        callbacks=[Probe()],
        default_root_dir=log_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    return recorder.result(
        side="ltpost",
        method=method,
        settings="ltpost defaults: padding-free"
        + (", reference log-probs precomputed (ReferenceModel auto)" if method == "dpo" else "")
        + (", prompts shared across a group's completions in packed rows" if method in ONLINE else ""),
        rss_before_mib=base_rss,
        peak_rss_mib=peak_rss_mib(),
        **info,
    )


# -- ltpost and the raw loop in lockstep (the per-method benchmarks' machinery) -------------------------------


def lockstep(method: str, steps: int, warmup: int, threads: int, log_dir: str) -> dict:
    """One round of the per-method benchmark restricted to this method's padding-free ltpost / raw pair."""
    if method == "sft":
        import sft_step

        variants = tuple(v for v in sft_step.VARIANTS if v.name in ("raw", "ltpost"))
        runs = sft_step.measure(
            variants, sft_step.make_data(BATCH_SIZE, steps), steps, 1, warmup, False, log_dir, threads
        )
        by = {run.variant: run for run in runs}
        ltpost, raw = by["ltpost"], by["raw"]
        equal = ltpost.losses == raw.losses and ltpost.data_digest == raw.data_digest
        return pair_result(ltpost.step_s, raw.step_s, ltpost.losses, raw.losses, warmup, equal, ltpost.tokens)
    if method in ("dpo", "reward"):
        import preference_step

        comparison = "dpo-precompute" if method == "dpo" else "reward"
        variants = tuple(v for v in preference_step.VARIANTS if v.comparison == comparison)
        datamodules = preference_step.make_data(BATCH_SIZE, steps)
        runs = preference_step.measure(variants, datamodules, steps, 1, warmup, False, log_dir)
        preference_step.check_same_work(variants, runs, 1e-5)  # raises unless batches and losses agree
        by = {run.variant: run for run in runs}
        ltpost, raw = by[f"{comparison}/ltpost"], by[f"{comparison}/raw"]
        return pair_result(ltpost.step_s, raw.step_s, ltpost.losses, raw.losses, warmup, None, ltpost.tokens)
    import online_step

    args = online_args(method, steps, warmup, threads)
    variants = tuple(v for v in online_step.ALL_VARIANTS if v.pair == method)
    restore = online_step.timed_in_modules()
    try:
        runs = online_step.measure(variants, args, online_step.make_data(args, steps), log_dir)
    finally:
        restore()
    checks = online_step.check_same_work(variants, runs)  # raises unless prompts, completions, losses agree
    by = {run.variant: run for run in runs}
    ltpost, raw = by[f"ltpost-{method}"], by[f"raw-{method}"]
    equal = all(check["losses_bitwise_equal"] for check in checks.values())
    result = pair_result(ltpost.step_s, raw.step_s, ltpost.losses, raw.losses, warmup, equal, None)
    result["outside_generation_ratio_paired_cpu"] = online_step.paired_median(
        online_step.outside_s(ltpost, "cpu"), online_step.outside_s(raw, "cpu"), warmup
    )
    return result


def pair_result(ours, base, our_losses, base_losses, warmup: int, bitwise: bool | None, tokens) -> dict:
    """ltpost / raw per clock: the median of per-step ratios (step i of both ran back to back) and the medians."""
    out = {"ltpost_step_s": ours, "raw_step_s": base, "ltpost_losses": our_losses, "raw_losses": base_losses}
    for c in CLOCKS:
        out[f"ratio_paired_{c}"] = statistics.median(a / b for a, b in zip(ours[c][warmup:], base[c][warmup:]))
    diffs = [abs(a - b) for a, b in zip(our_losses, base_losses)]
    out["max_abs_loss_diff"] = max(diffs)
    out["losses_bitwise_equal"] = bool(our_losses == base_losses) if bitwise is None else bool(bitwise)
    out["steps_compared"] = len(diffs)
    if tokens is not None:
        out["tokens_per_step"] = tokens
    return out


def worker(method: str, quick: bool, threads: int) -> dict:
    """The ltpost process of one method: ltpost alone first (its peak RSS), then ltpost and raw in lockstep."""
    steps, warmup = steps_for(method, quick)
    with tempfile.TemporaryDirectory(prefix="ltpost-compare-") as log_dir:
        solo = ltpost_solo(method, steps, warmup, threads, log_dir)
        pair = lockstep(method, steps, warmup, threads, log_dir)
    return {"ltpost": solo, "lockstep": pair}
