"""Benchmark one SFT training step: ltpost on Lightning versus a plain PyTorch loop, and padding-free versus padded.

Run from the repository root (CPU, about 2 minutes; ``--quick`` checks in well under a minute that it runs)::

    python bench/sft_step.py [--steps 60] [--warmup 10] [--rounds 3] [--batch-size 16] [--threads 1]
                             [--output bench/results/sft_step.json]

What is compared
----------------
Five training runs, on the same batches and from the same weights:

- ``raw`` / ``raw-padded``: a loop written out by hand, on padding-free / padded batches.
- ``ltpost`` / ``ltpost-padded``: ``lightning.pytorch.Trainer`` + ``ltpost.SFTModule`` + an ``SFTDataModule``,
  without a logger (the fairest comparison), on padding-free / padded batches.
- ``ltpost+tensorboard``: as ``ltpost`` with Lightning's default TensorBoard logger, so its cost is visible.

Every Trainer uses ``log_every_n_steps=50``. The comparisons, each read as a ratio to its baseline:

1. Overhead. ``ltpost`` / ``raw``, ``ltpost+tensorboard`` / ``raw``, ``ltpost-padded`` / ``raw-padded``. The raw
   step: ``model(input_ids, attention_mask, position_ids, use_cache=False)``, ``ltpost.losses.sft.nll_loss`` (the
   very function the module calls) with ``with_metrics`` on exactly the steps the module computes entropy and
   accuracy (``ltpost.metrics.is_logging_step``: step 0 and every 50th), the non-padding token count, backward,
   AdamW step, zero_grad, LR-scheduler step, with ``ltpost.optim.adamw_from_hparams`` (the optimizer and schedule
   the module builds) and the hyperparameters of ``configs/sft.yaml`` (minus gradient clipping, which would add
   the same work to both sides).
2. Padding-free versus padded: ``ltpost`` / ``ltpost-padded`` (two ltpost runs, paired the same way): time per
   step, non-padding tokens per second, and the fraction of batch slots that are padding.

Why the comparison is fair
--------------------------
- Same data: ``SFTDataModule.collate`` builds every batch once, before any run, from a seeded permutation of the
  first ``steps * batch_size`` rows of ``ltpost:arithmetic`` (chat, loss on the assistant turns, ``max_length``
  128), once padding-free and once padded from the same rows in the same order. Lightning reads these very batch
  objects through its datamodule's ``train_dataloader`` (one epoch = ``steps`` batches, so the schedules' lengths
  agree); the raw loops index the same lists. Every run fingerprints its batches and the script fails if two runs
  of one padding mode saw different batches, or if the two modes hold different non-padding tokens.
- Same model and math: the same seed right before each model is built (for Lightning in a callback's ``setup``
  hook, just before ``configure_model``), the same loader, optimizer, schedule and loss function as the module.
  Every run records every step's loss; the script fails unless each ltpost run's losses equal its raw loop's bit
  for bit on every step. Padding-free and padded losses only agree to rounding (different attention layouts):
  their first steps must agree within 1e-4, and the largest difference over the run is reported.
- Same timing window: Lightning's per-step time is measured by a callback from ``on_train_batch_start`` to
  ``on_train_batch_end`` (training_step, backward, optimizer and scheduler steps, ``self.log``); the raw loop
  times the same work. ``iter`` is each side's whole per-step cost: for Lightning the time between consecutive
  batch starts (adding data fetching, the batch-transfer hooks and the loop's bookkeeping, such as handing
  metrics to the logger), for the raw loop the step plus its own bookkeeping. ``fit`` is the whole run: model
  loading, setup, every step and the teardown.
- Lockstep: a shared 2-core machine's load changes over seconds, which made whole-run comparisons differ by 5-25%
  from round to round. So all five runs train at once, in one process, one step each in turn: step ``i`` of every
  run happens within about half a second, so a per-step ratio such as ``ltpost_i / raw_i`` sees one machine
  state, and its median (``ratio paired``, the headline figure) is far steadier than the ratio of the medians
  (also reported). The order of the five alternates forward and backward from step to step (every pair swaps
  who goes first) and rotates every two steps. Every run trains in a thread of its own (the raw loops too, so
  no run gets the main thread's treatment) and hands control back at the start of every step (for Lightning in
  ``on_train_batch_start``): only one run computes at any moment, the rest wait on a semaphore (no CPU time).
  Runs share only the process and the batch objects, which none modifies.
  ``ratio sum`` (total time of the measured steps over the baseline's same steps) amortizes the rare logging steps
  (step 49 of 60: entropy and accuracy on both sides, and for ``ltpost+tensorboard`` the write) that the medians
  skip over.
- Noise: one thread by default (on a shared 2-core machine a second thread makes tiny-model steps slower and
  noisy), an untimed warm-up round, the first ``--warmup`` steps of every run discarded, ``--rounds`` rounds,
  medians reported, per-round paired ratios shown. Every interval is measured as wall time and as CPU time of
  this process (all threads; only one computes at a time). CPU time stops while other processes hold the core, so
  on a busy machine it is the steadier of the two. Checkpointing, validation, the progress bar and the model
  summary are off; the built-in model is materialized into a fresh temporary ``LTPOST_CACHE``.

Result (``bench/results/sft_step.json``, 2-core shared CPU, load average ~1): every ltpost step within ~2% of its
raw loop (CPU time, paired medians 1.020 padding-free, 1.019 with TensorBoard, 1.016 padded; per round
1.006-1.039). Another full run gave 1.007 / 1.004 / 1.016: differences of 1-1.5% are within this benchmark's
run-to-run noise. The TensorBoard logger (one write in 50 steps) costs nothing measurable
(``ratio sum`` 1.015 against 1.022 without a logger). Padding-free steps take 0.962x the time of padded ones
(paired; 0.957-0.982 per round; 0.966 in the other run), i.e. 1.04x the non-padding tokens per second,
on batches that padding would fill to 20%: on this tiny model the per-step fixed costs dominate. Losses agree bit
for bit on every step, and entropy and accuracy are computed on the same steps (0 and 49) on both sides.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchlib import CLOCKS, clock, common_parser, environment, identity, parse_common, quiet, since

MODEL = "ltpost:tiny-llama"
DATASET = "ltpost:arithmetic"
SEED = 0
LOG_EVERY_N_STEPS = 50  # Lightning's default; ltpost computes entropy and accuracy on these steps only
# The shipped recipe (configs/sft.yaml), minus gradient clipping, which would only add the same work to both sides.
MODULE_KWARGS = {
    "model": MODEL,
    "loss_type": "nll",
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
}
DATA_KWARGS = {
    "dataset": DATASET,
    "tokenizer": MODEL,
    "eval_split": None,
    "assistant_only_loss": True,
    "max_length": 128,
}
PADDING_LOSS_TOLERANCE = 1e-4  # first-step |loss difference| allowed between padding-free and padded batches


@dataclass(frozen=True)
class Variant:
    name: str
    lightning: bool
    padding_free: bool
    tensorboard: bool = False
    baseline: str | None = None  # the raw loop this one's times are divided by


VARIANTS = (
    Variant("raw", lightning=False, padding_free=True),
    Variant("ltpost", lightning=True, padding_free=True, baseline="raw"),
    Variant("ltpost+tensorboard", lightning=True, padding_free=True, tensorboard=True, baseline="raw"),
    Variant("raw-padded", lightning=False, padding_free=False),
    Variant("ltpost-padded", lightning=True, padding_free=False, baseline="raw-padded"),
)
PADDING_PAIR = ("ltpost", "ltpost-padded")  # padding-free versus padded: both ltpost, no logger


@dataclass
class Run:
    """What one training run recorded; times in seconds, keyed by clock (``wall``, ``cpu``)."""

    variant: str
    round: int
    step_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one per step
    iter_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one fewer
    fit_s: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in CLOCKS})  # setup + steps + teardown
    load_average: float = 0.0  # 1-minute load average of the machine right after the run
    tokens: list[int] = field(default_factory=list)  # non-padding tokens per step
    slots: list[int] = field(default_factory=list)  # input_ids.numel() per step: tokens plus padding
    losses: list[float] = field(default_factory=list)
    metric_steps: list[int] = field(default_factory=list)  # steps that computed entropy and accuracy
    data_digest: str = ""  # the batches as given (padding included)
    token_digest: str = ""  # the non-padding tokens only: equal across padding modes

    def add(self, kind: dict[str, list[float]], start: tuple[float, float], end: tuple[float, float]) -> None:
        for name, a, b in zip(CLOCKS, start, end):
            kind[name].append(b - a)

    def finish(self, batches: list[dict], losses: list) -> None:
        """The conversions kept out of the timed loop (no syncs in it)."""
        self.load_average = os.getloadavg()[0]
        data, tokens = hashlib.sha256(), hashlib.sha256()
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            self.tokens.append(int(batch["num_tokens"]))
            self.slots.append(ids.numel())
            data.update(ids.numpy().tobytes())
            tokens.update((ids if mask is None else ids[mask.bool()]).numpy().tobytes())  # row by row, in order
        self.data_digest, self.token_digest = data.hexdigest()[:16], tokens.hexdigest()[:16]
        self.losses = [float(loss) for loss in losses]


# -- data -----------------------------------------------------------------------------------------------------


def make_data(batch_size: int, steps: int):
    """``datamodule(padding_free)``: a fresh datamodule (one per Trainer) serving that mode's fixed batches.

    Both modes' batches are collated once from the same rows in the same order; ``train_dataloader`` yields them
    as they are, so Lightning and the raw loops see the very same batch objects.
    """
    from torch.utils.data import DataLoader

    from ltpost import SFTDataModule

    class FixedBatches(SFTDataModule):
        batches: list[dict]

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.batches, batch_size=None, shuffle=False, collate_fn=identity)

    common = {**DATA_KWARGS, "batch_size": batch_size, "max_train_samples": steps * batch_size}
    source = FixedBatches(**common)
    source.setup("fit")
    dataset = source.train_dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SEED)).tolist()
    chunks = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)][:steps]
    if len(chunks) < steps:
        raise RuntimeError(f"only {len(chunks)} full batches of {batch_size} rows in {len(dataset)}; need {steps}")
    batches = {}
    for padding_free in (True, False):
        collator = FixedBatches(**common, padding_free=padding_free)
        collator.tokenizer = source.tokenizer
        batches[padding_free] = [collator.collate([dataset[i] for i in chunk]) for chunk in chunks]

    def datamodule(padding_free: bool) -> FixedBatches:
        # setup() skips whatever is already set: no second tokenization.
        module = FixedBatches(**common, padding_free=padding_free)
        module.tokenizer, module.train_dataset, module.batches = source.tokenizer, dataset, batches[padding_free]
        return module

    return datamodule


# -- the two kinds of run, each in its own thread, driven one step at a time ----------------------------------


class Side:
    """One training run in its own thread, paused at the start of every step until ``turn`` lets it go on.

    ``start`` runs the setup (model, optimizer) up to the first step; ``turn`` one step and whatever follows it
    up to the next step's start (for Lightning: the loop's bookkeeping and the next fetch); the last ``turn`` also
    the teardown. Only one run computes at any moment: the others and the main thread wait on semaphores.

    The raw loops get threads of their own too: in one full run with them in the main thread they came out
    2-13% slower per step than ltpost (paired CPU ratios 0.866, 0.979, 0.986 by round), in the run before 2%
    faster; cause not established (the main thread's malloc arena is one suspect). With every run in a worker
    thread, two full runs agreed within ~1.5%.
    """

    def __init__(self, variant: Variant, steps: int, round_index: int, threads: int) -> None:
        self.variant, self.steps, self.threads = variant, steps, threads
        self.run = Run(variant.name, round_index)
        self.seen, self.losses = [], []  # batches and losses by step, converted after the run (no syncs in it)
        self.go, self.paused = threading.Semaphore(0), threading.Semaphore(0)
        self.ended, self.error = False, None
        self.thread = threading.Thread(target=self._main, name=variant.name, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._wait()

    def turn(self, index: int) -> None:
        if self.ended:
            raise RuntimeError(f"{self.variant.name}: stopped after {len(self.losses)} of {self.steps} steps")
        self.go.release()
        self._wait()

    def finish(self) -> Run:
        self.thread.join()
        if len(self.losses) != self.steps:
            raise RuntimeError(f"{self.variant.name}: ran {len(self.losses)} steps, not {self.steps}")
        self.run.finish(self.seen, self.losses)
        return self.run

    def pause(self) -> None:
        """In the run's thread, at a step start: hand control back and wait for the step's turn."""
        self.paused.release()
        self.go.acquire()

    def train(self) -> None:
        raise NotImplementedError

    def _wait(self) -> None:
        self.paused.acquire()
        if self.error is not None:
            raise RuntimeError(f"{self.variant.name}: training failed") from self.error

    def _main(self) -> None:
        torch.set_num_threads(self.threads)  # intra-op threads are set per thread
        try:
            self.train()
        except BaseException as error:  # noqa: BLE001  (handed to the main thread, which raises it)
            self.error = error
        finally:
            self.ended = True
            self.paused.release()


class RawSide(Side):
    """The same training as ``SFTModule`` under Lightning, written out by hand."""

    def __init__(self, variant: Variant, batches: list[dict], steps: int, round_index: int, threads: int) -> None:
        super().__init__(variant, steps, round_index, threads)
        self.batches = batches

    def train(self) -> None:
        from ltpost import SFTModule
        from ltpost.losses.sft import nll_loss
        from ltpost.metrics import logs_at_step
        from ltpost.models import load_model
        from ltpost.optim import adamw_from_hparams

        hp = SFTModule(**MODULE_KWARGS).hparams  # the module's own defaults for all that the kwargs leave unset
        torch.manual_seed(SEED)
        model = load_model(hp.model, dtype=hp.dtype, attn_implementation=hp.attn_implementation).train()
        optim = adamw_from_hparams(model, hp, self.steps)
        optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        run, num_tokens, outer = self.run, 0, None
        for index, batch in enumerate(self.batches[: self.steps]):
            if outer is not None:  # the raw loop's whole per-step cost: step start to step start
                run.add(run.iter_s, outer, clock())
            self.pause()
            outer = start = clock()
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch["position_ids"],
                use_cache=False,
            ).logits  # [B, T, V]
            # ltpost's own rule; the optimizer steps done so far (index) play trainer.global_step.
            with_metrics = logs_at_step(index, LOG_EVERY_N_STEPS)
            loss, metrics = nll_loss(logits, batch["shift_labels"], hp.logits_chunk_size, with_metrics=with_metrics)
            num_tokens += batch["num_tokens"]  # as the module counts them
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            run.add(run.step_s, start, clock())
            self.seen.append(batch)
            self.losses.append(metrics["loss"])
            if with_metrics:
                run.metric_steps.append(index)


class LightningSide(Side):
    """``trainer.fit`` with a callback that pauses at every ``on_train_batch_start`` and times the batch."""

    def __init__(self, variant: Variant, datamodule, steps: int, round_index: int, log_dir: str, threads: int):
        super().__init__(variant, steps, round_index, threads)
        self.datamodule, self.log_dir = datamodule, log_dir

    def train(self) -> None:
        from lightning.pytorch import Callback, Trainer
        from lightning.pytorch.loggers import TensorBoardLogger

        from ltpost import SFTModule

        side, run = self, self.run

        class Lockstep(Callback):
            window: tuple[float, float] | None = None  # when this batch's turn began

            def setup(self, trainer, pl_module, stage):
                torch.manual_seed(SEED)  # configure_model runs right after the setup hooks: same init as raw

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if self.window is not None:  # Lightning's whole per-step cost: batch start to batch start
                    run.add(run.iter_s, self.window, clock())
                side.pause()
                self.window = clock()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                run.add(run.step_s, self.window, clock())
                side.seen.append(batch)
                side.losses.append(outputs["loss"].detach())
                if "entropy" in outputs:  # training_step returns the metrics it computed
                    run.metric_steps.append(batch_idx)

        name = f"{self.variant.name}-{run.round}"
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=self.steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=TensorBoardLogger(self.log_dir, name=name) if self.variant.tensorboard else False,
            log_every_n_steps=LOG_EVERY_N_STEPS,
            callbacks=[Lockstep()],
            default_root_dir=self.log_dir,
        )
        trainer.fit(SFTModule(**MODULE_KWARGS), datamodule=self.datamodule)


# -- one round: all variants in lockstep ----------------------------------------------------------------------


def step_order(sides: list, index: int) -> list:
    """Forward on even steps, backward on odd ones (every pair swaps who goes first), rotated every two steps."""
    shift = (index // 2) % len(sides)
    order = sides[shift:] + sides[:shift]
    return order if index % 2 == 0 else order[::-1]


def run_round(variants, datamodule, steps: int, round_index: int, log_dir: str, threads: int) -> list[Run]:
    """Set every run up one after the other, then train them all one step each in turn."""
    gc.collect()  # start every round from the same heap state; gc stays on, it is part of real training
    sides = []
    for variant in variants:
        if variant.lightning:
            sides.append(LightningSide(variant, datamodule(variant.padding_free), steps, round_index, log_dir, threads))
        else:
            sides.append(RawSide(variant, datamodule(variant.padding_free).batches, steps, round_index, threads))

    def timed(side, call, *args) -> None:  # a run's fit time: only what it spent itself, not the others' turns
        before = clock()
        call(*args)
        for name, value in since(before).items():
            side.run.fit_s[name] += value

    for side in sides:
        timed(side, side.start)
    for index in range(steps):
        for side in step_order(sides, index):
            timed(side, side.turn, index)
    return [side.finish() for side in sides]


def measure(variants, datamodule, steps: int, rounds: int, warmup: int, warmup_round: bool, log_dir: str, threads: int):
    """An untimed warm-up round (first-use costs: lazy imports, allocator growth, TensorBoard), then ``rounds``."""
    if warmup_round:
        run_round(variants, datamodule, 3, -1, log_dir, threads)
    runs = []
    names = {v.name: v for v in variants}
    for r in range(rounds):
        mine = {run.variant: run for run in run_round(variants, datamodule, steps, r, log_dir, threads)}
        runs += mine.values()
        cells = []
        for name, run in mine.items():
            baseline = names[name].baseline
            cell = f"{name} {1e3 * statistics.median(run.step_s['cpu'][warmup:]):.1f} ms"
            if baseline:
                paired = statistics.median(
                    a / b for a, b in zip(run.step_s["cpu"][warmup:], mine[baseline].step_s["cpu"][warmup:])
                )
                cell += f" (x{paired:.3f})"
            cells.append(cell)
        print(f"  round {r}  CPU medians, paired ratio to raw: " + ", ".join(cells) + f"   load {run.load_average:.2f}")
    return runs


# -- summary and checks ---------------------------------------------------------------------------------------


def paired_ratios(runs: list[Run], name: str, baseline: str, warmup: int) -> dict:
    """Per-step ratios of ``name`` over ``baseline`` (same round, same step index), per clock."""
    ours = sorted((run for run in runs if run.variant == name), key=lambda run: run.round)
    theirs = sorted((run for run in runs if run.variant == baseline), key=lambda run: run.round)
    out = {}
    for c in CLOCKS:
        per_round = [
            [a / b for a, b in zip(run.step_s[c][warmup:], base.step_s[c][warmup:])] for run, base in zip(ours, theirs)
        ]
        out[c] = {
            # Step i of both ran within about half a second: the median of these ratios is the headline figure.
            "ratio_step_paired": statistics.median(r for rnd in per_round for r in rnd),
            "ratio_step_paired_per_round": [statistics.median(rnd) for rnd in per_round],
            # Same steps, summed: the rare logging steps count in proportion, as they do in a long run.
            "ratio_sum": sum(sum(run.step_s[c][warmup:]) for run in ours)
            / sum(sum(base.step_s[c][warmup:]) for base in theirs),
        }
    return out


def summarize(variants, runs: list[Run], warmup: int) -> dict:
    """Medians per variant and clock over the measured steps of every round, and ratios to each baseline."""
    summary = {}
    for variant in variants:
        mine = [run for run in runs if run.variant == variant.name]
        tokens = sum(t for run in mine for t in run.tokens[warmup:])
        slots = sum(s for run in mine for s in run.slots[warmup:])
        measured_steps = sum(len(run.tokens[warmup:]) for run in mine)
        entry = {
            "lightning": variant.lightning,
            "padding_free": variant.padding_free,
            "tensorboard": variant.tensorboard,
            "padding_fraction": (slots - tokens) / slots,
            "tokens_per_step": tokens / measured_steps,
        }
        for c in CLOCKS:
            step = statistics.median(s for run in mine for s in run.step_s[c][warmup:])
            entry[c] = {
                "step_s": step,
                "iter_s": statistics.median(s for run in mine for s in run.iter_s[c][warmup:]),
                "step_s_per_round": [statistics.median(run.step_s[c][warmup:]) for run in mine],
                # Mean non-padding tokens per step over the median step time: robust to the occasional slow step.
                "tokens_per_s": tokens / measured_steps / step,
                "fit_s": statistics.median(run.fit_s[c] for run in mine),
            }
        summary[variant.name] = entry
    for variant in variants:
        if variant.baseline is None:
            continue
        mine, base = summary[variant.name], summary[variant.baseline]
        mine["baseline"] = variant.baseline
        paired = paired_ratios(runs, variant.name, variant.baseline, warmup)
        for c in CLOCKS:
            mine[c]["ratio_step"] = mine[c]["step_s"] / base[c]["step_s"]  # ratio of the medians
            mine[c]["ratio_iter"] = mine[c]["iter_s"] / base[c]["iter_s"]
            mine[c].update(paired[c])
    return summary


def summarize_padding(summary: dict, runs: list[Run], warmup: int) -> dict:
    """Padding-free ltpost over padded ltpost: time ratios (< 1: padding-free is faster) and throughputs."""
    free, padded = PADDING_PAIR
    paired = paired_ratios(runs, free, padded, warmup)
    entry = {
        "variant": free,
        "baseline": padded,
        "padding_fraction": {free: summary[free]["padding_fraction"], padded: summary[padded]["padding_fraction"]},
        "tokens_per_step": summary[free]["tokens_per_step"],  # the same non-padding tokens in both modes
    }
    for c in CLOCKS:
        entry[c] = {
            **paired[c],
            "ratio_step": summary[free][c]["step_s"] / summary[padded][c]["step_s"],
            "step_s": {free: summary[free][c]["step_s"], padded: summary[padded][c]["step_s"]},
            "tokens_per_s": {free: summary[free][c]["tokens_per_s"], padded: summary[padded][c]["tokens_per_s"]},
            "speedup_paired": 1 / paired[c]["ratio_step_paired"],  # padded time / padding-free time, per step
        }
    return entry


def check_same_work(variants, runs: list[Run]) -> dict:
    """Each ltpost run saw its raw loop's batches and computed bit-identical losses; both padding modes the same
    tokens, with first-step losses equal to rounding."""
    checks = {}
    for variant in (v for v in variants if v.baseline is not None):
        ours = sorted((run for run in runs if run.variant == variant.name), key=lambda run: run.round)
        theirs = sorted((run for run in runs if run.variant == variant.baseline), key=lambda run: run.round)
        digests = {run.data_digest for run in ours + theirs}
        mismatched = [
            (run.round, step)
            for run, base in zip(ours, theirs)
            for step, (a, b) in enumerate(zip(run.losses, base.losses))
            if a != b
        ]
        checks[variant.name] = {
            "baseline": variant.baseline,
            "identical_batches": len(digests) == 1,
            "losses_bitwise_equal": not mismatched
            and all(len(r.losses) == len(b.losses) for r, b in zip(ours, theirs)),
            "max_abs_loss_diff": max(
                abs(a - b) for run, base in zip(ours, theirs) for a, b in zip(run.losses, base.losses)
            ),
            "first_step_loss": {"ltpost": ours[0].losses[0], "raw": theirs[0].losses[0]},
            "same_metric_steps": all(run.metric_steps == base.metric_steps for run, base in zip(ours, theirs)),
            "metric_steps": ours[0].metric_steps,
            "steps_compared": sum(len(run.losses) for run in ours),
        }
        if len(digests) != 1:
            raise RuntimeError(
                f"{variant.name}: runs saw different batches ({digests}); the comparison would be unfair."
            )
        if not checks[variant.name]["same_metric_steps"]:
            raise RuntimeError(
                f"{variant.name}: entropy and accuracy computed on steps {[r.metric_steps for r in ours]}, "
                f"{variant.baseline} on {[b.metric_steps for b in theirs]}: the raw loop does different work."
            )
        if not checks[variant.name]["losses_bitwise_equal"]:
            raise RuntimeError(
                f"{variant.name}: losses differ from {variant.baseline}'s at (round, step) {mismatched[:5]} "
                f"(max |diff| {checks[variant.name]['max_abs_loss_diff']:.1e}): the two loops do different math."
            )
    free, padded = PADDING_PAIR
    ours = sorted((run for run in runs if run.variant == free), key=lambda run: run.round)
    theirs = sorted((run for run in runs if run.variant == padded), key=lambda run: run.round)
    token_digests = {run.token_digest for run in ours + theirs}
    first_diff = max(abs(run.losses[0] - base.losses[0]) for run, base in zip(ours, theirs))
    checks["padding_free_vs_padded"] = {
        "same_tokens": len(token_digests) == 1,
        "first_step_loss": {free: ours[0].losses[0], padded: theirs[0].losses[0]},
        "first_step_loss_diff": first_diff,
        "max_abs_loss_diff": max(
            abs(a - b) for run, base in zip(ours, theirs) for a, b in zip(run.losses, base.losses)
        ),
        "tolerance": PADDING_LOSS_TOLERANCE,
    }
    if len(token_digests) != 1:
        raise RuntimeError(f"padding-free and padded batches hold different tokens ({token_digests}).")
    if first_diff > PADDING_LOSS_TOLERANCE:
        raise RuntimeError(f"padding-free and padded first-step losses differ by {first_diff:.1e}: different math.")
    return checks


def markdown_tables(summary: dict, padding: dict) -> str:
    def both(values: dict, key: str, scale: float = 1e3, fmt: str = ".1f") -> str:
        return " / ".join(f"{scale * values[c][key]:{fmt}}" for c in CLOCKS)

    lines = [
        "Median per step, `wall / CPU`. ratio = ltpost / raw loop on the same batches: `paired` is the median of the",
        "per-step ratios (step i of both ran back to back), `step` and `iter` the ratios of the medians (`iter` adds",
        "what the loop does between steps), `sum` the ratio of total measured-step times (logging steps included).",
        "CPU time is the steadier clock.",
        "",
        (
            "| variant | padding | logger | step ms | iter ms | ratio paired | ratio step | ratio iter | ratio sum "
            "| paired ratio per round (CPU) | non-padding tokens/s | tokens/step | fit s |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, s in summary.items():
        ratios = ("—",) * 5
        if "baseline" in s:
            per_round = ", ".join(f"{r:.3f}" for r in s["cpu"]["ratio_step_paired_per_round"])
            keys = ("ratio_step_paired", "ratio_step", "ratio_iter", "ratio_sum")
            ratios = tuple(both(s, key, 1, ".3f") for key in keys) + (per_round,)
        padding_cell = "free" if s["padding_free"] else f"padded ({s['padding_fraction']:.0%} pad)"
        cells = (
            name,
            padding_cell,
            "TensorBoard" if s["tensorboard"] else "none",
            both(s, "step_s"),
            both(s, "iter_s"),
            *ratios,
            both(s, "tokens_per_s", 1, ".0f"),
            f"{s['tokens_per_step']:.0f}",
            both(s, "fit_s", 1, ".1f"),
        )
        lines.append("| " + " | ".join(cells) + " |")

    free, padded = padding["variant"], padding["baseline"]
    lines += [
        "",
        f"Padding-free vs padded ({free} vs {padded}, same rows, no logger; `wall / CPU`): time ratio = {free} /",
        f"{padded}, `paired` per step as above; speedup = 1 / paired ratio.",
        "",
        "| variant | step ms | non-padding tokens/s | non-padding tokens/step | padding fraction |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in (free, padded):
        step = " / ".join(f"{1e3 * padding[c]['step_s'][name]:.1f}" for c in CLOCKS)
        rate = " / ".join(f"{padding[c]['tokens_per_s'][name]:.0f}" for c in CLOCKS)
        lines.append(
            f"| {name} | {step} | {rate} | {padding['tokens_per_step']:.0f} | {padding['padding_fraction'][name]:.3f} |"
        )
    per_round = ", ".join(f"{r:.3f}" for r in padding["cpu"]["ratio_step_paired_per_round"])
    lines += [
        "",
        (
            f"time ratio paired {both(padding, 'ratio_step_paired', 1, '.3f')}, of the medians "
            f"{both(padding, 'ratio_step', 1, '.3f')}, sum {both(padding, 'ratio_sum', 1, '.3f')}; "
            f"speedup paired {both(padding, 'speedup_paired', 1, '.2f')}x; paired per round (CPU) {per_round}"
        ),
    ]
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = common_parser(__doc__.split("\n\n")[0], steps=60, warmup=10, batch_help="chat rows per step")
    return parse_common(parser, argv)  # --steps >= 50 reaches a logging step


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    env = environment()
    print(
        f"{args.rounds} round(s) x {len(VARIANTS)} variants in lockstep x {args.steps} steps, "
        f"first {args.warmup} discarded"
    )

    with tempfile.TemporaryDirectory(prefix="ltpost-bench-") as scratch:
        # A fresh cache: the built-in model is materialized from the current code, never read from a folder
        # that an older version of the tokenizer or config left in ~/.cache/ltpost.
        os.environ["LTPOST_CACHE"] = str(Path(scratch) / "cache")
        datamodule = make_data(args.batch_size, args.steps)
        runs = measure(
            VARIANTS, datamodule, args.steps, args.rounds, args.warmup, not args.quick, scratch, args.threads
        )
    checks = check_same_work(VARIANTS, runs)
    summary = summarize(VARIANTS, runs, args.warmup)
    padding = summarize_padding(summary, runs, args.warmup)
    env["total_s"] = time.perf_counter() - started

    print()
    print(markdown_tables(summary, padding))
    print()
    for name, check in checks.items():
        if "baseline" in check:
            print(
                f"{name} vs {check['baseline']}: identical batches {check['identical_batches']}, losses bitwise equal "
                f"on all {check['steps_compared']} steps {check['losses_bitwise_equal']}, metrics on the same "
                f"steps {check['same_metric_steps']} ({check['metric_steps']})"
            )
        else:
            print(
                f"padding-free vs padded: same tokens {check['same_tokens']}, first-step |loss diff| "
                f"{check['first_step_loss_diff']:.1e}, max over the run {check['max_abs_loss_diff']:.1e}"
            )
    busiest = max(run.load_average for run in runs)
    if busiest > args.threads + 0.5:
        print(
            f"warning: the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores: other processes "
            "competed for the CPU, so wall times are inflated and noisy; the CPU-time figures are the steadier ones."
        )
    print(f"total {env['total_s']:.0f} s")

    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "model": MODEL,
            "dataset": DATASET,
            "seed": SEED,
            "log_every_n_steps": LOG_EVERY_N_STEPS,
            "module": MODULE_KWARGS,
            "data": DATA_KWARGS,
        },
        "env": env,
        "checks": checks,
        "summary": summary,
        "padding": padding,
        "runs": [asdict(run) for run in runs],
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
