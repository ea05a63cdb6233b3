"""Benchmark one preference-learning training step: ltpost on Lightning versus a plain PyTorch loop.

Run from the repository root (CPU, about 3-4 minutes; ``--quick`` checks in well under a minute that it runs)::

    python bench/preference_step.py [--steps 24] [--warmup 4] [--rounds 3] [--batch-size 16] [--threads 1]
                                    [--output bench/results/preference_step.json]

What is compared
----------------
Each comparison is an ltpost variant (``lightning.pytorch.Trainer`` + the module + a ``PreferenceDataModule``) and
a raw loop written out by hand doing the same work, on the same batches, from the same weights:

1. ``dpo-precompute``: ``ltpost.DPOModule`` with ``ReferenceModel(mode="precompute")`` (what ``auto`` picks for
   full fine-tuning). The raw loop also precomputes the reference log-probs of every training pair once before
   its first step (same batch size, same collate, same no-grad forward) and looks them up by ``example_index``.
   That one-time cost is kept out of the per-step times of both sides and reported on its own (``ref setup``).
2. ``dpo-copy``: ``ReferenceModel(mode="copy")``. The raw loop loads a frozen copy of the initial weights (the
   one-time ``ref setup``) and runs the same no-grad reference forward on it at every step.
3. ``dpo-precompute-padded``: as 1. on padded batches (``padding_free=False``) instead of padding-free ones.
4. ``reward``: ``ltpost.RewardModule`` against a raw loop calling ``ltpost.modules.reward.sequence_scores`` and
   ``ltpost.losses.reward.bradley_terry_loss``.

The DPO raw step: one policy forward over the concatenated chosen + rejected sequences
(``model(input_ids, attention_mask, position_ids, use_cache=False)``), ``ltpost.losses.logprobs.
selective_log_softmax`` and ``ltpost.losses.dpo.sequence_logps`` for the sequence log-probs, ``ltpost.losses.dpo.
dpo_loss`` (the module's pure loss, metrics included), backward, AdamW step, zero_grad, LR-scheduler step. The
reward raw step: ``sequence_scores``, ``bradley_terry_loss``, backward, AdamW step, zero_grad, scheduler step.
Both use ``ltpost.optim.adamw_from_hparams`` (the very optimizer and schedule the modules build) and the
hyperparameters of ``configs/dpo.yaml`` / ``configs/reward.yaml`` (minus gradient clipping, which would add the
same work to both sides). The raw reference forwards run under ``torch.inference_mode()`` followed by a clone,
as ``ReferenceModel`` does (on this model ``no_grad`` costs the same within noise).

Why the comparison is fair
--------------------------
- Same data: ``PreferenceDataModule(...).collate`` builds every batch once, before any run, from a seeded
  permutation of the first ``steps * batch_size`` pairs of ``ltpost:arithmetic-preference`` (``max_length`` 128,
  as the configs). The Lightning side reads exactly these batch objects through its datamodule's
  ``train_dataloader`` (one epoch = ``steps`` batches, so the schedules' lengths agree); the raw loop iterates
  the same list. Each run fingerprints its batches and the script fails if two runs of one comparison differ.
- Same model and math: the same seed right before the model is built (for the Lightning side in a callback's
  ``setup`` hook, which runs just before ``configure_model``: the reward model's ``score`` head is randomly
  initialized), the same loaders and functions as the modules. Both sides record every step's loss; the script
  fails unless the first-step losses agree (``--loss-tolerance``) and every later step's too.
- Same timing window: Lightning's per-step time is measured by a callback from ``on_train_batch_start`` to
  ``on_train_batch_end`` (training_step, the reference lookup or forward, backward, optimizer and scheduler steps,
  ``self.log``); the raw loop times the same work. ``iter`` is each side's whole per-step cost: for Lightning the
  time between consecutive batch starts (adding data fetching, the batch-transfer hooks and the loop's
  bookkeeping), for the raw loop the step plus its own bookkeeping. ``ref setup`` is the one-time reference cost
  (the precompute pass, or loading the frozen copy), timed inside ``ReferenceModel.on_fit_start`` for Lightning.
- Lockstep: a shared 2-core machine's load changes over seconds, which made whole-run comparisons differ by 10-25%
  from round to round. So both sides of a comparison train at once, in one process, alternating steps: the
  Lightning callback runs raw step ``i`` just before its own timed window on even ``i`` and just after it on odd
  ``i`` (cancelling any first-or-second bias); the raw time is subtracted from Lightning's ``iter`` and fit
  totals. Step ``i`` of both sides runs within a fraction of a second, so the per-step ratio
  ``ltpost_i / raw_i`` sees one machine state, and its median (``ratio paired``, the headline figure) is far
  steadier than the ratio of the medians (also reported). The raw loop's state (model, optimizer, reference)
  is its own; the two only share the process, its allocator and the batch objects, which neither modifies.
- Noise: one thread by default (on a shared 2-core machine a second thread makes tiny-model steps slower and
  noisy), an untimed warm-up round, the first ``--warmup`` steps of every run discarded, comparisons interleaved
  in a rotating order over ``--rounds`` rounds, medians reported, per-round paired ratios shown. Every interval
  is measured as wall time and as CPU time of this process; CPU time stops while other processes hold the core,
  so on a busy machine it is the steadier of the two. Checkpointing, validation, the logger, the progress bar and
  the model summary are off; the built-in model is materialized into a fresh temporary ``LTPOST_CACHE``.

Result (``bench/results/preference_step.json``, 2-core shared CPU): every ltpost step within ~2% of its raw loop
(CPU time, paired medians 1.011-1.017; 1.009-1.015 in an earlier full run), under the 1.05 target. The 2-3 ms per
step are Lightning's per-step machinery, measured by wrapping the calls: ``self.log`` of the loss (~0.7-0.9 ms),
the optimizer-closure wrappers, ``zero_grad`` and the hook dispatch (~1 ms inside the optimizer step, <1 ms
outside it). Losses agree bit for bit on every step.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchlib import CLOCKS, clock, common_parser, environment, identity, parse_common, quiet, since

MODEL = "ltpost:tiny-llama"
DATASET = "ltpost:arithmetic-preference"
SEED = 0
IGNORE_INDEX = -100
# The shipped recipes (configs/dpo.yaml, configs/reward.yaml) from the built-in model, minus gradient clipping.
DPO_KWARGS = {
    "model": MODEL,
    "loss_type": "sigmoid",
    "beta": 0.3,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
}
REWARD_KWARGS = {
    "model": MODEL,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.01,
}
DATA_KWARGS = {"dataset": DATASET, "tokenizer": MODEL, "eval_split": None, "max_length": 128}


@dataclass(frozen=True)
class Variant:
    name: str
    comparison: str  # the ltpost variant and its raw loop share this
    method: str  # "dpo" or "reward"
    lightning: bool
    padding_free: bool
    reference: str | None = None  # ReferenceModel mode for DPO: "precompute" or "copy"
    baseline: str | None = None  # the variant this one's times are divided by


def pair(
    comparison: str, method: str, padding_free: bool = True, reference: str | None = None
) -> tuple[Variant, Variant]:
    raw = Variant(f"{comparison}/raw", comparison, method, False, padding_free, reference)
    ltpost = Variant(f"{comparison}/ltpost", comparison, method, True, padding_free, reference, baseline=raw.name)
    return raw, ltpost


VARIANTS = (
    *pair("dpo-precompute", "dpo", reference="precompute"),
    *pair("dpo-copy", "dpo", reference="copy"),
    *pair("dpo-precompute-padded", "dpo", padding_free=False, reference="precompute"),
    *pair("reward", "reward"),
)


@dataclass
class Run:
    """What one training run recorded; times in seconds, keyed by clock (``wall``, ``cpu``)."""

    variant: str
    round: int
    step_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one per step
    iter_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one fewer
    reference_setup_s: dict[str, float] = field(default_factory=dict)  # one-time: precompute pass or copy load
    fit_s: dict[str, float] = field(default_factory=dict)  # the whole run: model loading and setup included
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
        self.fit_s = since(start)
        self.load_average = os.getloadavg()[0]
        digest = hashlib.sha256()
        for batch in batches:
            self.tokens.append(int(batch["num_tokens"]))
            self.slots.append(batch["input_ids"].numel())
            digest.update(batch["input_ids"].numpy().tobytes())
        self.data_digest = digest.hexdigest()[:16]
        self.losses = [float(loss) for loss in losses]


# -- data -----------------------------------------------------------------------------------------------------


def make_data(batch_size: int, steps: int):
    """Padding-free and padded datamodules over one tokenized dataset, and each mode's fixed batches.

    The datamodules' ``train_dataloader`` yields the precollated batches in order, so Lightning and the raw loop
    see the very same batch objects, and ``ReferenceModel(mode="precompute")`` covers exactly the pairs trained on.
    """
    from torch.utils.data import DataLoader

    from ltpost import PreferenceDataModule

    class FixedBatches(PreferenceDataModule):
        batches: list[dict]  # set below, once both modules exist

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.batches, batch_size=None, shuffle=False, collate_fn=identity)

    common = {**DATA_KWARGS, "batch_size": batch_size, "max_train_samples": steps * batch_size}
    padding_free = FixedBatches(**common, padding_free=True)
    padding_free.setup("fit")
    padded = FixedBatches(**common, padding_free=False)
    # setup() skips whatever is already set, so the padded module reuses the tokenizer and the tokenized rows.
    padded.tokenizer, padded.train_dataset = padding_free.tokenizer, padding_free.train_dataset
    dataset = padding_free.train_dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SEED)).tolist()
    chunks = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if len(chunks) < steps:
        raise RuntimeError(
            f"only {len(chunks)} full batches of {batch_size} pairs in {len(dataset)} rows; need {steps}"
        )
    for datamodule in (padding_free, padded):
        datamodule.batches = [datamodule.collate([dataset[i] for i in chunk]) for chunk in chunks[:steps]]
    return {True: padding_free, False: padded}


# -- the raw loops --------------------------------------------------------------------------------------------


def dpo_sequence_logps(model, batch: dict, chunk_size: int):
    """``[2B]`` completion log-probs (chosen first) and ``[2B]`` completion lengths, from one concatenated forward."""
    from ltpost.losses.dpo import sequence_logps
    from ltpost.losses.logprobs import selective_log_softmax

    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits  # [R, T, V]
    labels = batch["shift_labels"]  # [R, T]
    mask = labels != IGNORE_INDEX  # [R, T]
    token_logps = selective_log_softmax(logits, labels.clamp(min=0), chunk_size) * mask  # [R, T]
    return sequence_logps(token_logps, mask, batch["sequence_ids"], 2 * batch["num_pairs"])  # [2B], [2B]


def reference_pairs(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """``[B, 2]`` (chosen, rejected) reference log-probs."""
    logps, _ = dpo_sequence_logps(model, batch, chunk_size)  # [2B]
    pairs = batch["num_pairs"]
    return torch.stack([logps[:pairs], logps[pairs:]], dim=-1)  # [B, 2]


@torch.inference_mode()
def precompute_reference(model, datamodule, chunk_size: int) -> torch.Tensor:
    """``[N, 2]`` reference log-probs of every training pair, by ``example_index``, in eval-batch-size batches."""
    from torch.utils.data import DataLoader

    dataset = datamodule.train_dataset
    model.eval()
    table = torch.full((len(dataset), 2), float("nan"))
    for batch in DataLoader(dataset, batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collate):
        table[batch["example_index"]] = reference_pairs(model, batch, chunk_size).float()
    model.train()
    return table


class RawLoop:
    """The same training as the module under Lightning, written out by hand; ``step(i)`` runs batch ``i``."""

    def __init__(self, variant: Variant, datamodule, steps: int, round_index: int) -> None:
        from ltpost import DPOModule, RewardModule
        from ltpost.models import load_model
        from ltpost.optim import adamw_from_hparams

        self.variant, self.datamodule = variant, datamodule
        self.dpo = variant.method == "dpo"
        # The modules' own defaults for all that the kwargs leave unset.
        self.hp = hp = (DPOModule(**DPO_KWARGS) if self.dpo else RewardModule(**REWARD_KWARGS)).hparams
        self.run = Run(variant.name, round_index)
        self.batches, self.losses = [], []
        self.time_in_steps = {c: 0.0 for c in CLOCKS}  # all that step() cost, bookkeeping included
        self.start_fit = clock()

        torch.manual_seed(SEED)  # the reward model's score head is randomly initialized
        task = "causal-lm" if self.dpo else "sequence-classification"
        self.model = load_model(hp.model, task=task, dtype=hp.dtype, attn_implementation=hp.attn_implementation)
        self.model.train()
        self.table = self.reference = None
        if variant.reference == "precompute":
            start = clock()
            self.table = precompute_reference(self.model, datamodule, hp.logits_chunk_size)
            self.run.reference_setup_s = since(start)
        elif variant.reference == "copy":
            start = clock()
            self.reference = load_model(hp.model, dtype=hp.dtype, attn_implementation=hp.attn_implementation).eval()
            self.reference.requires_grad_(False)
            self.run.reference_setup_s = since(start)
        optim = adamw_from_hparams(self.model, hp, steps)
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.setup_s = since(self.start_fit)

    def step(self, index: int) -> None:
        from ltpost.losses.dpo import PreferenceLogps, dpo_loss
        from ltpost.losses.reward import bradley_terry_loss
        from ltpost.modules.reward import sequence_scores

        outer = clock()
        hp, model = self.hp, self.model
        batch = self.datamodule.batches[index]
        start = clock()
        pairs = batch["num_pairs"]
        if self.dpo:
            logps, lengths = dpo_sequence_logps(model, batch, hp.logits_chunk_size)  # [2B], [2B]
            if self.table is not None:
                ref = self.table[batch["example_index"]]  # [B, 2]
            else:
                with torch.inference_mode():
                    ref = reference_pairs(self.reference, batch, hp.logits_chunk_size)  # [B, 2]
                ref = ref.clone()  # a normal tensor, as ReferenceModel returns
            inputs = PreferenceLogps(
                chosen=logps[:pairs],
                rejected=logps[pairs:],
                ref_chosen=ref[:, 0],
                ref_rejected=ref[:, 1],
                chosen_lengths=lengths[:pairs],
                rejected_lengths=lengths[pairs:],
            )
            loss, metrics = dpo_loss(
                inputs,
                loss_type=hp.loss_type,
                loss_weights=hp.loss_weights,
                beta=hp.beta,
                label_smoothing=hp.label_smoothing,
                f_divergence_type=hp.f_divergence_type,
                f_alpha_divergence_coef=hp.f_alpha_divergence_coef,
                discopop_tau=hp.discopop_tau,
            )
        else:
            scores = sequence_scores(model, batch)  # [2B]
            chosen, rejected = scores[:pairs], scores[pairs:]
            loss, metrics = bradley_terry_loss(chosen, rejected, batch.get("margin"), hp.center_rewards_coefficient)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        end = clock()
        self.run.add(self.run.step_s, start, end)
        self.batches.append(batch)
        self.losses.append(metrics["loss"])
        for name, value in since(outer).items():
            self.time_in_steps[name] += value
        self.run.add(self.run.iter_s, outer, clock())  # the raw loop's whole per-step cost

    def finish(self) -> Run:
        self.run.finish(self.start_fit, self.batches, self.losses)
        # The steps ran interleaved with Lightning's: count the setup and the steps' own time only.
        self.run.fit_s = {c: self.setup_s[c] + self.time_in_steps[c] for c in CLOCKS}
        return self.run


# -- one comparison: Lightning and the raw loop in lockstep ---------------------------------------------------


def run_pair(raw_variant: Variant, variant: Variant, datamodule, steps: int, round_index: int, log_dir: str):
    """Train both sides at once, alternating steps: raw i then ltpost i on even i, ltpost i then raw i on odd i.

    The raw step runs inside the Lightning callback, outside the timed window; it is subtracted from Lightning's
    ``iter`` and ``fit`` intervals. Adjacent steps see the same machine load, so per-step paired ratios cancel
    most of the noise of a shared machine; alternating the order cancels any first-or-second bias.
    """
    from lightning.pytorch import Callback, Trainer

    from ltpost import DPOModule, ReferenceModel, RewardModule

    gc.collect()  # start every run from the same heap state; gc stays on, it is part of real training
    raw = RawLoop(raw_variant, datamodule, steps, round_index)
    run = Run(variant.name, round_index)
    batches, losses = [], []
    raw_inside = {c: 0.0 for c in CLOCKS}  # raw time spent inside fit, to subtract from Lightning's totals

    def raw_step(index: int, interval: dict[str, float]) -> None:
        before = clock()
        raw.step(index)
        for name, value in since(before).items():
            interval[name] += value
            raw_inside[name] += value

    class TimedReferenceModel(ReferenceModel):
        """Times the one-time reference setup (the precompute pass, or loading the frozen copy)."""

        def on_fit_start(self, trainer, pl_module):
            start = clock()
            super().on_fit_start(trainer, pl_module)
            run.reference_setup_s = since(start)

    class LockstepTimer(Callback):
        """Times each Lightning batch, runs the raw step beside it, keeps batches and losses for the checks."""

        def __init__(self) -> None:
            self.mark: tuple[float, float] | None = None  # the previous batch start
            self.window: tuple[float, float] | None = None  # this batch's timed window start
            self.raw_in_interval = {c: 0.0 for c in CLOCKS}  # raw time since the previous batch start

        def setup(self, trainer, pl_module, stage):
            torch.manual_seed(SEED)  # configure_model runs right after the setup hooks: same init as the raw loop

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = clock()
            if self.mark is not None:  # Lightning's whole per-step cost: the interval minus the raw step in it
                run.iter_s["wall"].append(now[0] - self.mark[0] - self.raw_in_interval["wall"])
                run.iter_s["cpu"].append(now[1] - self.mark[1] - self.raw_in_interval["cpu"])
            self.mark, self.raw_in_interval = now, {c: 0.0 for c in CLOCKS}
            if batch_idx % 2 == 0:
                raw_step(batch_idx, self.raw_in_interval)
            batches.append(batch)  # a reference: counting and hashing wait until after the run
            self.window = clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            run.add(run.step_s, self.window, clock())
            losses.append(outputs["loss"].detach())
            if batch_idx % 2 == 1:
                raw_step(batch_idx, self.raw_in_interval)

    callbacks = [LockstepTimer()]
    if variant.method == "dpo":
        module = DPOModule(**DPO_KWARGS)
        callbacks.insert(0, TimedReferenceModel(mode=variant.reference))  # its batch-end hook runs inside the window
    else:
        module = RewardModule(**REWARD_KWARGS)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        log_every_n_steps=50,
        callbacks=callbacks,
        default_root_dir=log_dir,
    )
    start = clock()
    trainer.fit(module, datamodule=datamodule)
    run.finish(start, batches, losses)
    run.fit_s = {c: run.fit_s[c] - raw_inside[c] for c in CLOCKS}
    if len(raw.losses) != steps:
        raise RuntimeError(f"{variant.name}: the raw loop ran {len(raw.losses)} steps, Lightning {len(losses)}")
    return raw.finish(), run


# -- measurement schedule -------------------------------------------------------------------------------------


def measure(variants, datamodules, steps: int, rounds: int, warmup: int, warmup_round: bool, log_dir: str):
    """An untimed warm-up round, then ``rounds`` rounds, each running every comparison in a rotated order."""
    pairs = [(variants_by_name(variants)[v.baseline], v) for v in variants if v.baseline is not None]

    def one(raw_variant: Variant, variant: Variant, n: int, round_index: int) -> tuple[Run, Run]:
        return run_pair(raw_variant, variant, datamodules[variant.padding_free], n, round_index, log_dir)

    if warmup_round:  # first-use costs: lazy imports, allocator growth, kernels' first calls
        for raw_variant, variant in pairs:
            one(raw_variant, variant, 3, -1)
    runs = []
    for r in range(rounds):
        shift = r % len(pairs)
        for raw_variant, variant in pairs[shift:] + pairs[:shift]:
            raw_run, run = one(raw_variant, variant, steps, r)
            runs += [raw_run, run]
            ms = {
                name: [1e3 * statistics.median(x.step_s[c][warmup:]) for c in CLOCKS]
                for name, x in (("raw", raw_run), ("ltpost", run))
            }
            paired = statistics.median(
                a / b for a, b in zip(run.step_s["cpu"][warmup:], raw_run.step_s["cpu"][warmup:])
            )
            print(
                f"  round {r}  {variant.comparison:<22} raw {ms['raw'][0]:6.1f} / {ms['raw'][1]:6.1f} ms  "
                f"ltpost {ms['ltpost'][0]:6.1f} / {ms['ltpost'][1]:6.1f} ms (wall / CPU)  "
                f"paired CPU ratio {paired:.3f}   load average {run.load_average:.2f}",
                flush=True,
            )
    return runs


def variants_by_name(variants) -> dict[str, Variant]:
    return {v.name: v for v in variants}


# -- summary and checks ---------------------------------------------------------------------------------------


def summarize(variants, runs: list[Run], warmup: int) -> dict:
    """Medians per variant and clock over the measured steps of every round, and ratios to each baseline."""
    summary = {}
    for variant in variants:
        mine = [run for run in runs if run.variant == variant.name]
        tokens = sum(t for run in mine for t in run.tokens[warmup:])
        slots = sum(s for run in mine for s in run.slots[warmup:])
        measured_steps = sum(len(run.tokens[warmup:]) for run in mine)
        entry = {
            "comparison": variant.comparison,
            "method": variant.method,
            "lightning": variant.lightning,
            "padding_free": variant.padding_free,
            "reference": variant.reference,
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
            if variant.reference is not None:
                entry[c]["reference_setup_s"] = statistics.median(run.reference_setup_s[c] for run in mine)
        summary[variant.name] = entry
    for variant in variants:
        if variant.baseline is None:
            continue
        mine, base = summary[variant.name], summary[variant.baseline]
        mine["baseline"] = variant.baseline
        ours = sorted((run for run in runs if run.variant == variant.name), key=lambda run: run.round)
        theirs = sorted((run for run in runs if run.variant == variant.baseline), key=lambda run: run.round)
        for c in CLOCKS:
            mine[c]["ratio_step"] = mine[c]["step_s"] / base[c]["step_s"]  # ratio of the medians
            mine[c]["ratio_iter"] = mine[c]["iter_s"] / base[c]["iter_s"]
            # Step i of both sides ran back to back: the median of these ratios is the headline figure.
            per_round = [
                [a / b for a, b in zip(run.step_s[c][warmup:], raw.step_s[c][warmup:])]
                for run, raw in zip(ours, theirs)
            ]
            mine[c]["ratio_step_paired"] = statistics.median(r for rnd in per_round for r in rnd)
            mine[c]["ratio_step_paired_per_round"] = [statistics.median(rnd) for rnd in per_round]
    return summary


def check_same_work(variants, runs: list[Run], tolerance: float) -> dict:
    """Both sides of a comparison saw the same batches and computed the same losses, from the first step on."""
    checks = {}
    for comparison in dict.fromkeys(v.comparison for v in variants):
        names = {v.name: v.lightning for v in variants if v.comparison == comparison}
        group = [run for run in runs if run.variant in names]
        ltpost = [run for run in group if names[run.variant]]
        raw = [run for run in group if not names[run.variant]]
        digests = {run.data_digest for run in group}
        first = {"ltpost": [run.losses[0] for run in ltpost], "raw": [run.losses[0] for run in raw]}
        first_diff = max(abs(a - b) for a in first["ltpost"] for b in first["raw"])
        max_diff = max(abs(a - b) for run in group for a, b in zip(run.losses, group[0].losses))
        checks[comparison] = {
            "identical_batches": len(digests) == 1,
            "first_step_loss": {"ltpost": first["ltpost"][0], "raw": first["raw"][0]},
            "first_step_loss_diff": first_diff,
            "max_abs_loss_diff": max_diff,
            "tolerance": tolerance,
        }
        if len(digests) != 1:
            raise RuntimeError(f"{comparison}: runs saw different batches ({digests}); the comparison would be unfair.")
        if first_diff > tolerance:
            raise RuntimeError(
                f"{comparison}: first-step losses differ (ltpost {first['ltpost']}, raw {first['raw']}): the two "
                "sides start from different weights or do different math."
            )
        if max_diff > tolerance:
            raise RuntimeError(f"{comparison}: losses differ by up to {max_diff:.2e}; the two loops do different math.")
    return checks


def markdown_table(summary: dict) -> str:
    def both(entry: dict, key: str, scale: float = 1e3, fmt: str = ".1f") -> str:
        return " / ".join(f"{scale * entry[c][key]:{fmt}}" for c in CLOCKS)

    lines = [
        "Median per step, `wall / CPU`. ratio = ltpost / raw loop on the same batches: `paired` is the median of the",
        "per-step ratios (step i of both sides ran back to back), `step` and `iter` the ratios of the medians; `iter`",
        "adds what the loop does between steps (data fetch, batch transfer, hooks). CPU time is the steadier clock.",
        "",
        (
            "| variant | padding | reference | step ms | iter ms | ratio paired | ratio step | ratio iter "
            "| paired ratio per round (CPU) | non-padding tokens/s | tokens/step | ref setup s |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, s in summary.items():
        ratios = ("—",) * 4
        if "baseline" in s:
            per_round = ", ".join(f"{r:.3f}" for r in s["cpu"]["ratio_step_paired_per_round"])
            ratios = tuple(both(s, key, 1, ".3f") for key in ("ratio_step_paired", "ratio_step", "ratio_iter"))
            ratios += (per_round,)
        setup = both(s, "reference_setup_s", 1, ".2f") if s["reference"] else "—"
        padding = "free" if s["padding_free"] else f"padded ({s['padding_fraction']:.0%} pad)"
        cells = (
            name,
            padding,
            s["reference"] or "—",
            both(s, "step_s"),
            both(s, "iter_s"),
            *ratios,
            both(s, "tokens_per_s", 1, ".0f"),
            f"{s['tokens_per_step']:.0f}",
            setup,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = common_parser(
        __doc__.split("\n\n")[0], steps=24, warmup=4, batch_help="preference pairs per step (2x sequences)"
    )
    parser.add_argument("--loss-tolerance", type=float, default=1e-5, help="max |loss difference| between sides")
    return parse_common(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    env = environment()
    comparisons = len({v.comparison for v in VARIANTS})
    print(
        f"{args.rounds} round(s) x {comparisons} comparisons (ltpost and raw in lockstep) x {args.steps} steps, "
        f"first {args.warmup} discarded"
    )

    with tempfile.TemporaryDirectory(prefix="ltpost-bench-") as scratch:
        # A fresh cache: the built-in model is materialized from the current code, never read from a folder
        # that an older version of the tokenizer or config left in ~/.cache/ltpost.
        os.environ["LTPOST_CACHE"] = str(Path(scratch) / "cache")
        datamodules = make_data(args.batch_size, args.steps)
        runs = measure(VARIANTS, datamodules, args.steps, args.rounds, args.warmup, not args.quick, scratch)
    checks = check_same_work(VARIANTS, runs, args.loss_tolerance)
    summary = summarize(VARIANTS, runs, args.warmup)
    env["total_s"] = time.perf_counter() - started

    print()
    print(markdown_table(summary))
    print()
    for comparison, check in checks.items():
        loss = check["first_step_loss"]
        print(
            f"{comparison}: identical batches {check['identical_batches']}, first-step loss ltpost {loss['ltpost']:.6f} "
            f"raw {loss['raw']:.6f}, max |loss diff| over all steps {check['max_abs_loss_diff']:.1e}"
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
            "dpo": DPO_KWARGS,
            "reward": REWARD_KWARGS,
            "data": DATA_KWARGS,
        },
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
