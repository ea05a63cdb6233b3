"""Benchmark one SFT training step: ltpost on Lightning versus a plain PyTorch loop, and padding-free versus padded.

Run from the repository root (CPU, 2-3 minutes; ``--quick`` checks in a few seconds of training that it runs)::

    python bench/sft_step.py [--steps 60] [--rounds 3] [--batch-size 16] [--threads 1] [--output results.json]

What is compared
----------------
1. Overhead. ``lightning.pytorch.Trainer`` + ``ltpost.SFTModule`` + ``ltpost.SFTDataModule`` (built-in model
   ``ltpost:tiny-llama``, dataset ``ltpost:arithmetic``) against a hand-written loop doing the same work: forward,
   ``ltpost.losses.sft.nll_loss`` (the very function the module calls, metrics included), backward, AdamW step,
   zero_grad, LR-scheduler step. Once without a logger (the fairest comparison) and once with Lightning's
   default TensorBoard logger (``log_every_n_steps=50``), so its cost is visible. In both padding modes.
2. Padding-free versus padded. ltpost with ``padding_free=True`` against ``padding_free=False`` on the same chat
   data: time per step, non-padding tokens per second, and the fraction of batch slots that are padding.

Why the comparison is fair
--------------------------
- Same data: both sides iterate ``SFTDataModule.train_dataloader()`` (same dataset, sampler and collate), and
  both seed torch's global RNG right before the loader's iterator is created (Lightning creates it just after
  ``on_fit_start``), so the shuffle order is identical. Every run fingerprints its batches and the script fails
  if two runs of the same padding mode saw different data.
- Same model and math: the same seed before loading, the same loader (``ltpost.models.load_model``), the same
  optimizer parameter groups, hyperparameters and schedule as ``SFTModule.configure_optimizers``, the same loss
  function and chunk size. Both sides record their per-step losses, and the script fails unless they agree.
- Same timing window: Lightning's per-step time is measured by a callback from ``on_train_batch_start`` to
  ``on_train_batch_end`` (training_step, backward, optimizer and scheduler steps, ``self.log``); the raw loop
  times the same work. Also reported: the time between consecutive batch starts (``iter``: adds data loading,
  collate and the loop's bookkeeping such as sending metrics to the logger) and the whole ``fit`` time divided
  by steps (``fit``: adds model loading and trainer setup), so overhead outside the batch hooks shows too.
- Noise: one thread by default (on a shared 2-core machine a second thread makes tiny-model steps 5-10x slower
  and noisy), an untimed warm-up round, the first ``--warmup`` steps of every run discarded, variants
  interleaved in a rotating order over ``--rounds`` rounds, medians reported, and the per-round paired ratios
  shown so the spread is visible. Every interval is measured twice: wall time, and CPU time of this process.
  CPU time stops while other processes hold the core, so on a busy machine it is the steadier of the two
  (the script reports the load average and warns when the machine was busy). Even so, on a shared machine
  single rounds can differ by 5-10%: look at the per-round ratios, and use more ``--rounds`` on a quiet
  machine before reading a difference of a few percent. Checkpointing, validation, the progress bar and the
  model summary are off, and the built-in model is materialized into a fresh cache from the current code.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODEL = "ltpost:tiny-llama"
DATASET = "ltpost:arithmetic"
SEED = 0
# The shipped recipe (configs/sft.yaml), minus gradient clipping, which would only add the same work to both sides.
MODULE_KWARGS = dict(model=MODEL, learning_rate=2e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_ratio=0.05)
DATA_KWARGS = dict(dataset=DATASET, tokenizer=MODEL, eval_split=None, assistant_only_loss=True, max_length=128)
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Variant:
    name: str
    lightning: bool
    padding_free: bool
    tensorboard: bool = False
    baseline: str | None = None  # the variant this one's times are divided by in the summary


VARIANTS = (
    Variant("raw", lightning=False, padding_free=True),
    Variant("ltpost", lightning=True, padding_free=True, baseline="raw"),
    Variant("ltpost+tensorboard", lightning=True, padding_free=True, tensorboard=True, baseline="raw"),
    Variant("raw-padded", lightning=False, padding_free=False),
    Variant("ltpost-padded", lightning=True, padding_free=False, baseline="raw-padded"),
)


def clock() -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads, so a logger's writer thread counts)."""
    return time.perf_counter(), time.process_time()


@dataclass
class Run:
    """What one training run recorded; times in seconds, keyed by clock (``wall``, ``cpu``)."""

    variant: str
    round: int
    step_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one per step
    iter_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one fewer
    fit_s: dict[str, float] = field(default_factory=dict)  # the whole run, setup included
    load_average: float = 0.0  # 1-minute load average of the machine right after the run
    tokens: list[int] = field(default_factory=list)  # non-padding tokens per step
    slots: list[int] = field(default_factory=list)  # input_ids.numel() per step: tokens plus padding
    losses: list[float] = field(default_factory=list)
    data_digest: str = ""

    def add(self, kind: dict[str, list[float]], start: tuple[float, float], end: tuple[float, float]) -> None:
        for name, a, b in zip(CLOCKS, start, end):
            kind[name].append(b - a)

    def finish(self, start: tuple[float, float], batches: list[dict], losses: list) -> None:
        """Close the run: total times, then the conversions kept out of the timed loop (no syncs in it)."""
        self.fit_s = {name: b - a for name, a, b in zip(CLOCKS, start, clock())}
        self.load_average = os.getloadavg()[0]
        digest = hashlib.sha256()
        for batch in batches:
            self.tokens.append(int(batch["num_tokens"]))
            self.slots.append(batch["input_ids"].numel())
            digest.update(batch["input_ids"].numpy().tobytes())
        self.data_digest = digest.hexdigest()[:16]
        self.losses = [float(loss) for loss in losses]


# -- the two training loops -----------------------------------------------------------------------------------


def make_datamodules(batch_size: int):
    """Padding-free and padded datamodules over one tokenized dataset (tokenizing once keeps the setup short)."""
    from ltpost import SFTDataModule

    padding_free = SFTDataModule(**DATA_KWARGS, batch_size=batch_size, padding_free=True)
    padding_free.setup("fit")
    padded = SFTDataModule(**DATA_KWARGS, batch_size=batch_size, padding_free=False)
    # setup() skips whatever is already set, so the padded module reuses the tokenizer and the tokenized rows.
    padded.tokenizer, padded.train_dataset = padding_free.tokenizer, padding_free.train_dataset
    return {True: padding_free, False: padded}


def run_ltpost(variant: Variant, datamodule, steps: int, round_index: int, log_dir: str) -> Run:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from ltpost import SFTModule

    run = Run(variant.name, round_index)
    batches, losses = [], []

    class StepTimer(Callback):
        """Times each batch from inside the loop; keeps references to batches and losses for the checks."""

        start: tuple[float, float] | None = None

        def on_fit_start(self, trainer, pl_module):
            # Lightning creates the train iterator (drawing the shuffle seed from the global RNG) right after this.
            torch.manual_seed(SEED)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = clock()
            if self.start is not None:
                run.add(run.iter_s, self.start, now)
            self.start = now
            batches.append(batch)  # a reference: counting and hashing wait until after the run

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            run.add(run.step_s, self.start, clock())
            losses.append(outputs["loss"])

    logger = TensorBoardLogger(save_dir=log_dir, name=variant.name) if variant.tensorboard else False
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        log_every_n_steps=50,
        callbacks=[StepTimer()],
        default_root_dir=log_dir,
    )
    torch.manual_seed(SEED)  # model init: the raw loop seeds the same way before loading
    module = SFTModule(**MODULE_KWARGS)
    start = clock()
    trainer.fit(module, datamodule=datamodule)
    run.finish(start, batches, losses)
    return run


def run_raw(variant: Variant, datamodule, steps: int, round_index: int) -> Run:
    """The same step as ``SFTModule`` under Lightning, written out by hand."""
    from transformers import get_scheduler

    from ltpost import SFTModule
    from ltpost.losses.sft import nll_loss
    from ltpost.models import load_model

    hp = SFTModule(**MODULE_KWARGS).hparams  # the module's own defaults for all that MODULE_KWARGS leaves unset
    run = Run(variant.name, round_index)
    batches, losses = [], []
    start_fit = clock()

    torch.manual_seed(SEED)
    model = load_model(hp.model, dtype=hp.dtype, attn_implementation=hp.attn_implementation).train()
    # Mirrors SFTModule.configure_optimizers: no weight decay on biases and norms, warmup from warmup_ratio.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
        betas=(hp.adam_beta1, hp.adam_beta2),
        eps=hp.adam_epsilon,
    )
    warmup = hp.warmup_steps or math.ceil(hp.warmup_ratio * steps)
    scheduler = get_scheduler(hp.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    loader = datamodule.train_dataloader()
    torch.manual_seed(SEED)  # as the Lightning side does in on_fit_start, so the shuffle order matches
    data = iter(loader)
    previous = None
    for _ in range(steps):
        batch = next(data)
        start = clock()  # the Lightning window also opens once the batch is fetched
        if previous is not None:
            run.add(run.iter_s, previous, start)
        previous = start
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        loss, metrics = nll_loss(logits, batch["shift_labels"], hp.logits_chunk_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        run.add(run.step_s, start, clock())
        batches.append(batch)
        losses.append(metrics["loss"])
    run.finish(start_fit, batches, losses)
    return run


# -- measurement schedule -------------------------------------------------------------------------------------


def measure(variants, datamodules, steps: int, rounds: int, warmup: int, warmup_round: bool, log_dir: str):
    """An untimed warm-up round, then ``rounds`` rounds, each running every variant in a rotated order."""

    def one(variant: Variant, n: int, round_index: int) -> Run:
        gc.collect()  # start every run from the same heap state; gc stays on, it is part of real training
        datamodule = datamodules[variant.padding_free]
        if variant.lightning:
            return run_ltpost(variant, datamodule, n, round_index, log_dir)
        return run_raw(variant, datamodule, n, round_index)

    if warmup_round:  # first-use costs: lazy imports, allocator growth, TensorBoard start-up
        for variant in variants:
            one(variant, 3, -1)
    runs = []
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            run = one(variant, steps, r)
            runs.append(run)
            wall, cpu = (1e3 * statistics.median(run.step_s[c][warmup:]) for c in CLOCKS)
            print(
                f"  round {r}  {variant.name:<20} step {wall:7.2f} ms wall {cpu:7.2f} ms CPU (median)"
                f"   load average {run.load_average:.2f}"
            )
    return runs


# -- summary --------------------------------------------------------------------------------------------------


def summarize(variants, runs: list[Run], steps: int, warmup: int) -> dict:
    """Medians per variant and clock over the measured steps of every round, and ratios to each baseline."""
    by_variant = {v.name: [run for run in runs if run.variant == v.name] for v in variants}
    summary = {}
    for variant in variants:
        mine = by_variant[variant.name]
        tokens = sum(t for run in mine for t in run.tokens[warmup:])
        slots = sum(s for run in mine for s in run.slots[warmup:])
        measured_steps = sum(len(run.tokens[warmup:]) for run in mine)
        entry = {
            "padding_free": variant.padding_free,
            "lightning": variant.lightning,
            "tensorboard": variant.tensorboard,
            "padding_fraction": (slots - tokens) / slots,
            "tokens_per_step": tokens / measured_steps,
        }
        for c in CLOCKS:
            step = statistics.median(s for run in mine for s in run.step_s[c][warmup:])
            entry[c] = {
                "step_s": step,
                "iter_s": statistics.median(s for run in mine for s in run.iter_s[c][warmup:]),
                "fit_s_per_step": statistics.median(run.fit_s[c] / steps for run in mine),
                "step_s_per_round": [statistics.median(run.step_s[c][warmup:]) for run in mine],
                # Mean tokens per step over the median step time: robust to the occasional slow step.
                "tokens_per_s": tokens / measured_steps / step,
            }
        summary[variant.name] = entry
    for variant in variants:
        if variant.baseline is None:
            continue
        mine, base = summary[variant.name], summary[variant.baseline]
        mine["baseline"] = variant.baseline
        for c in CLOCKS:
            mine[c]["ratio_step"] = mine[c]["step_s"] / base[c]["step_s"]
            mine[c]["ratio_iter"] = mine[c]["iter_s"] / base[c]["iter_s"]
            mine[c]["ratio_fit"] = mine[c]["fit_s_per_step"] / base[c]["fit_s_per_step"]
            # Same round, so both sides ran under similar machine load.
            pairs = zip(mine[c]["step_s_per_round"], base[c]["step_s_per_round"])
            mine[c]["ratio_step_per_round"] = [a / b for a, b in pairs]
    return summary


def check_same_work(variants, runs: list[Run]) -> dict:
    """Runs of one padding mode must have seen the same batches and computed the same losses."""
    checks = {}
    for padding_free in (True, False):
        names = {v.name for v in variants if v.padding_free == padding_free}
        group = [run for run in runs if run.variant in names]
        if not group:
            continue
        digests = {run.data_digest for run in group}
        max_diff = max(abs(a - b) for run in group for a, b in zip(run.losses, group[0].losses))
        mode = "padding_free" if padding_free else "padded"
        checks[mode] = {"identical_batches": len(digests) == 1, "max_abs_loss_diff": max_diff}
        if len(digests) != 1:
            raise RuntimeError(f"{mode}: runs saw different batches ({digests}); the comparison would be unfair.")
        if max_diff > 1e-4:
            raise RuntimeError(f"{mode}: losses differ by up to {max_diff:.2e}; the two loops do different math.")
    return checks


def markdown_tables(summary: dict) -> str:
    def pair(entry: dict, key: str, scale: float = 1e3, fmt: str = ".2f") -> str:
        return " / ".join(f"{scale * entry[c][key]:{fmt}}" for c in CLOCKS)

    lines = [
        "Overhead: median per step, `wall / CPU`; ratio = variant / raw loop on the same batches",
        "",
        (
            "| variant | padding | step ms | iter ms | fit/step ms | ratio step | ratio iter | ratio fit "
            "| per-round step ratios (CPU) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in summary.items():
        padding = "free" if s["padding_free"] else "padded"
        ratios = ("—",) * 4
        if "baseline" in s:
            per_round = ", ".join(f"{r:.3f}" for r in s["cpu"]["ratio_step_per_round"])
            ratios = tuple(pair(s, f"ratio_{k}", 1, ".3f") for k in ("step", "iter", "fit")) + (per_round,)
        cells = (name, padding, pair(s, "step_s"), pair(s, "iter_s"), pair(s, "fit_s_per_step")) + ratios
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Padding-free vs padded (ltpost, no logger; `wall / CPU`)",
        "",
        "| variant | step ms | non-padding tokens/s | non-padding tokens/step | padding fraction |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("ltpost", "ltpost-padded"):
        if name in summary:
            s = summary[name]
            lines.append(
                f"| {name} | {pair(s, 'step_s')} | {pair(s, 'tokens_per_s', 1, '.0f')} "
                f"| {s['tokens_per_step']:.1f} | {s['padding_fraction']:.3f} |"
            )
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of every run left out of the statistics")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="a few steps, one round: checks that the script runs")
    parser.add_argument("--output", type=Path, help="write every timing and the summary to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 4, 1, 1
    if args.steps < args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 2 (medians need measured steps and intervals)")
    return args


def quiet() -> None:
    """Silence per-run chatter (device info, tips, progress bars) so the timings stay readable."""
    import datasets
    import lightning.pytorch  # noqa: F401  (configures its loggers on import, so levels are set afterwards)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    import lightning
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
    }
    print(f"torch threads: {torch.get_num_threads()}  (torch {torch.__version__}, lightning {lightning.__version__})")
    print(f"{args.rounds} round(s) x {len(VARIANTS)} variants x {args.steps} steps, first {args.warmup} discarded")

    with tempfile.TemporaryDirectory(prefix="ltpost-bench-") as scratch:
        # A fresh cache: the built-in model is materialized from the current code, never read from a folder
        # that an older version of the tokenizer or config left in ~/.cache/ltpost.
        os.environ["LTPOST_CACHE"] = str(Path(scratch) / "cache")
        datamodules = make_datamodules(args.batch_size)
        runs = measure(VARIANTS, datamodules, args.steps, args.rounds, args.warmup, not args.quick, scratch)
    checks = check_same_work(VARIANTS, runs)
    summary = summarize(VARIANTS, runs, args.steps, args.warmup)

    print()
    print(markdown_tables(summary))
    print()
    for mode, check in checks.items():
        diff = check["max_abs_loss_diff"]
        print(f"{mode}: identical batches {check['identical_batches']}, max |loss diff| {diff:.1e}")
    busiest = max(run.load_average for run in runs)
    if busiest > args.threads + 0.5:
        print(
            f"warning: the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores: other processes "
            "competed for the CPU, so wall times are inflated and noisy; the CPU-time figures are the steadier ones."
        )

    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"model": MODEL, "dataset": DATASET, "seed": SEED, "module": MODULE_KWARGS, "data": DATA_KWARGS},
        "env": env,
        "checks": checks,
        "summary": summary,
        "runs": [asdict(run) for run in runs],
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
