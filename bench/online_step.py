"""Benchmark one online RL step (GRPO, RLOO): ltpost on Lightning versus a plain PyTorch loop, split into phases.

Run from the repository root (CPU, a few minutes; ``--quick`` checks in under a minute that it runs)::

    python bench/online_step.py [--steps 8] [--warmup 2] [--rounds 3] [--batch-size 16] [--threads 1]
                                [--pairs grpo,rloo,rloo-kl] [--output bench/results/online_step.json]

A full run writes ``bench/results/online_step.json`` unless ``--output`` says otherwise; ``--quick`` writes only
where ``--output`` points (so a quick check never overwrites the full run's result).

What is compared
----------------
Three pairs, each an ltpost run and a loop written out by hand doing the same work on the same prompts:

- ``ltpost-grpo`` / ``raw-grpo``: ``lightning.pytorch.Trainer`` + ``ltpost.GRPOModule`` + ``ltpost.PromptDataModule``
  (no logger, ``log_every_n_steps=50`` as in ``bench/sft_step.py``), loss ``dapo`` (the module's default).
- ``ltpost-rloo`` / ``raw-rloo``: the same with ``ltpost.RLOOModule`` and ``beta=0`` (no reference model).
- ``ltpost-rloo-kl`` / ``raw-rloo-kl``: ``RLOOModule`` with ``beta=0.05`` (its default): the KL to a frozen copy
  of the initial weights is folded into the reward, which needs the sampling policy's log-probs (one no-grad
  forward) and the reference's (one inference-mode forward on the copy, as ``ReferenceModel(mode="copy")``).

The settings are those of ``configs/grpo.yaml`` and ``configs/rloo.yaml`` but for the group size (16 prompts x 8
generations per step here, 16 in the configs; ``max_completion_length`` 8, temperature 1, learning rate 1e-4
constant, ``packing_row_tokens`` 512, ``max_prompt_length`` 64, shared prompts) on the built-in
``ltpost:tiny-llama`` (``--model ltpost:tiny-llama-sft`` for the configs' start). A random tiny-llama never writes the right
sum, so ``integer_accuracy`` alone would give every completion reward 0, every advantage 0, a zero gradient and a
policy that never moves: the same work, but a weak check (the losses would all be 0). So the reward functions are
``[integer_accuracy, even_token_fraction]``: the second (defined here, like ``tests/helpers.even_token_reward``)
is the fraction of a completion's tokens with an even id, which varies between completions of any model. Every
advantage is then non-zero, the policy moves every step, and every later step's completions depend on the earlier
updates: a loop that differed anywhere would diverge.

The raw GRPO step, with the very functions the module calls: ``ltpost.rollout.scoring.generate_and_score`` (the
``HFRolloutEngine`` from ``default_engine`` on the policy, decoding, the reward functions), ``group_advantages``
and ``rollout_metrics`` (the round's reward and length metrics, which the module computes every round),
``pack_rollout``, ``completion_logps`` (with entropies on the steps the module computes them:
``ltpost.metrics.logs_at_step``), ``grpo_loss`` with ``num_items_in_batch`` as the module computes it (the round's
completion tokens over ``world_size * steps_per_generation``), backward, AdamW step, zero_grad, scheduler step
(``ltpost.optim.adamw_from_hparams``: the module's optimizer and schedule). The raw RLOO step: the same up to the
packing, then (``beta > 0``) the no-grad policy forward and the reference forward, ``rloo_kl``, ``rloo_advantages``
with the KL penalty, ``completion_logps``, ``rloo_loss`` on-policy (``old_logps=None``), backward and the optimizer.
The ltpost side is the module itself, untouched: the bench only wraps two instance attributes
(``module.rollout_engine.generate`` and ``module.generate_and_score``), ``module.log`` (to count calls) and the
advantage and metric functions in the module's namespace, all with the same timers the raw loop uses.

Why the comparison is fair, and why the losses are bit-identical
----------------------------------------------------------------
- Same prompts: one ``PromptDataModule`` tokenizes the first ``steps * prompts_per_step`` prompts once; every
  Lightning run gets a fresh datamodule holding the same tokenizer and dataset (so ``setup`` has nothing to do)
  and reads its generation rounds through ``train_dataloader`` (the seeded shuffle of epoch 0); every raw loop
  iterates ``datamodule.rounds(1, 1)``, the same rounds in the same order. Each run fingerprints its prompts'
  ``example_index`` and the script fails if two runs of a pair saw different prompts.
- Same random state: sampling draws from torch's global CPU generator, which every thread of the process shares.
  Right before each step's timed window, both sides of a pair reseed it with ``SEED + step`` (for Lightning in
  ``on_train_batch_start``); only one run computes at any moment (see Lockstep), so nothing draws from it between
  the reseed and the sampling. Same weights (the same checkpoint) + same prompts + same generator state + the same
  code = the same completions, which the script checks (a digest of every step's completion ids and rewards).
- Same math: deterministic CPU kernels on the same inputs in the same order, so every step's loss and the final
  weights are compared bit for bit; the script fails on any difference. Entropies are computed on the same steps
  on both sides (step 0 and every 50th), and the script checks it.
- No wasted forward: a forward pre-hook on the policy counts its calls inside ``generate`` and outside it, and one
  on the reference model counts the reference's. With ``num_iterations=1`` and ``steps_per_generation=1`` a
  rollout is trained on once, on-policy: without a KL term there must be no old-log-prob forward, exactly one
  training forward per packed row (``completion_logps`` runs one forward per row). The script fails if an ltpost
  run does more forwards outside generation than its raw loop, or (``beta=0``) more than one per row.
- Time split, identical on both sides (the same timer wraps the same calls): ``generation`` is
  ``engine.generate`` (sampling, the KV cache, the recorded log-probs); ``scoring`` is the rest of
  ``generate_and_score`` (decoding, the reward functions) plus the advantages and the round's metrics;
  ``training`` is the rest of the step: packing, the forwards outside generation (old-policy and reference ones
  included), loss, backward, optimizer and scheduler steps, and for Lightning its per-step machinery
  (``self.log`` of the round metrics and the loss, hooks, the optimizer closure). ``outside generation`` is
  scoring + training: the overhead target (ltpost within ~5% of the raw loop) is about this part, since
  generation is the same ``model.generate`` call on both sides and would hide any overhead in a total.
- Same timing window as ``bench/sft_step.py``: ``on_train_batch_start`` to ``on_train_batch_end`` for Lightning
  (training_step with its generation round, backward, optimizer and scheduler steps), the same work in the raw loop.
  ``iter`` is each side's whole per-step cost (step start to step start: data fetching and the loop's bookkeeping
  added). ``fit`` is the whole run (model loading, setup, every step, teardown).
- Lockstep (as ``bench/sft_step.py``): all runs train at once, one step each in turn, each in its own thread
  (raw loops too), the others waiting on a semaphore. Step ``i`` of every run happens within a few seconds, so a
  per-step ratio ``ltpost_i / raw_i`` sees one machine state; its median (``paired``) is the headline figure.
  The order alternates forward and backward and rotates every two steps.
- Noise: one thread by default, an untimed warm-up round (2 steps), the first ``--warmup`` steps of every run
  discarded, ``--rounds`` rounds, medians. Wall and CPU time of the process (all threads; one computes at a time):
  on a busy shared machine CPU time is the steadier clock. The built-in model is materialized into a fresh
  temporary ``LTPOST_CACHE``.
"""

from __future__ import annotations

import argparse
import functools
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
from benchlib import CLOCKS, clock, common_parser, environment, parse_common, quiet, since

MODEL = "ltpost:tiny-llama"
DATASET = "ltpost:arithmetic-prompts"
SEED = 0
LOG_EVERY_N_STEPS = 50  # as bench/sft_step.py: entropy is computed on step 0 and every 50th only
RESULT = Path(__file__).resolve().parent / "results" / "online_step.json"
KL_BETA = 0.05  # RLOOModule's default


def even_token_fraction(prompts: list, completions: list, completion_ids: list, **kwargs) -> list[float]:
    """Fraction of a completion's tokens with an even id: varies between completions of even a random model, so the
    advantages are non-zero and the policy moves (``integer_accuracy`` alone gives a random model 0 everywhere)."""
    return [sum(token % 2 == 0 for token in ids) / max(len(ids), 1) for ids in completion_ids]


REWARD_FUNCS = ["ltpost.rewards.integer_accuracy", even_token_fraction]
# configs/grpo.yaml and configs/rloo.yaml (model, generations and completion length come from the flags).
COMMON_KWARGS = {
    "reward_funcs": REWARD_FUNCS,
    "temperature": 1.0,
    "beta": 0.0,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "packing_row_tokens": 512,
}
GRPO_KWARGS = {**COMMON_KWARGS, "loss_type": "dapo"}
DATA_KWARGS = {"dataset": DATASET, "eval_split": None, "max_prompt_length": 64, "seed": SEED}


@dataclass(frozen=True)
class Variant:
    name: str
    pair: str  # the ltpost run and its raw loop share this
    method: str  # "grpo" or "rloo"
    lightning: bool
    beta: float = 0.0
    baseline: str | None = None  # the raw loop this one's times are divided by


def pair(name: str, method: str, beta: float = 0.0) -> tuple[Variant, Variant]:
    raw = Variant(f"raw-{name}", name, method, False, beta)
    return raw, Variant(f"ltpost-{name}", name, method, True, beta, baseline=raw.name)


ALL_VARIANTS = (*pair("grpo", "grpo"), *pair("rloo", "rloo"), *pair("rloo-kl", "rloo", KL_BETA))
PAIRS = tuple(dict.fromkeys(v.pair for v in ALL_VARIANTS))


def module_kwargs(variant: Variant, args: argparse.Namespace) -> dict:
    kwargs = dict(GRPO_KWARGS if variant.method == "grpo" else COMMON_KWARGS)
    kwargs.update(
        model=args.model,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        beta=variant.beta,
    )
    return kwargs


def module_class(variant: Variant):
    from ltpost import GRPOModule, RLOOModule

    return GRPOModule if variant.method == "grpo" else RLOOModule


@dataclass
class Run:
    """What one training run recorded; times in seconds, keyed by clock (``wall``, ``cpu``), one entry per step."""

    variant: str
    round: int
    step_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    iter_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # one fewer
    generation_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    scoring_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    training_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    fit_s: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in CLOCKS})
    load_average: float = 0.0  # 1-minute load average of the machine right after the run
    forwards_generation: list[int] = field(default_factory=list)  # policy forwards inside engine.generate
    forwards_outside: list[int] = field(default_factory=list)  # policy forwards outside it (training, old logps)
    forwards_reference: list[int] = field(default_factory=list)  # reference-model forwards
    rows: list[int] = field(default_factory=list)  # packed rows of the step's training batch
    completion_tokens: list[int] = field(default_factory=list)
    log_calls: list[int] = field(default_factory=list)  # LightningModule.log calls (ltpost runs only)
    losses: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # mean reward of the step's completions
    entropy_steps: list[int] = field(default_factory=list)  # steps that computed the entropy
    prompt_digest: str = ""  # example_index of every step's prompts
    completion_digest: str = ""  # every step's completion ids
    reward_digest: str = ""  # every step's rewards, bit for bit
    weights_digest: str = ""  # the final weights, bit for bit


# -- one training run in its own thread, paused at every step start (the design of bench/sft_step.py) ----------


class Active:
    """The run computing right now (one at a time): the module-level timers below report to it."""

    side: Side | None = None


class Side:
    """One training run in its own thread, paused at the start of every step until ``turn`` lets it go on.

    ``start`` runs the setup up to the first step; ``turn`` one step and whatever follows it up to the next step's
    start; the last ``turn`` also the teardown. Only one run computes at any moment: the others and the main thread
    wait on semaphores. Also holds the per-step probes: timers by phase and forward counters.
    """

    def __init__(self, variant: Variant, args: argparse.Namespace, steps: int, round_index: int) -> None:
        self.variant, self.args, self.steps = variant, args, steps
        self.run = Run(variant.name, round_index)
        self.kwargs = module_kwargs(variant, args)
        self.losses, self.prompts, self.scored = [], [], []  # per step, converted after the run (no syncs in it)
        self.model = None  # the policy, for the final weights
        self.buckets: dict[str, list[float]] = {}
        self.counts: dict[str, int] = {}
        self.in_generation = False
        self.go, self.paused = threading.Semaphore(0), threading.Semaphore(0)
        self.ended, self.error = False, None
        self.thread = threading.Thread(target=self._main, name=variant.name, daemon=True)

    # -- lockstep

    def start(self) -> None:
        Active.side = self
        self.thread.start()
        self._wait()

    def turn(self, index: int) -> None:
        if self.ended:
            raise RuntimeError(f"{self.variant.name}: stopped after {len(self.losses)} of {self.steps} steps")
        Active.side = self
        self.go.release()
        self._wait()

    def pause(self) -> None:
        """In the run's thread, at a step start: hand control back and wait for the step's turn."""
        self.paused.release()
        self.go.acquire()

    def _wait(self) -> None:
        self.paused.acquire()
        Active.side = None
        if self.error is not None:
            raise RuntimeError(f"{self.variant.name}: training failed") from self.error

    def _main(self) -> None:
        torch.set_num_threads(self.args.threads)  # intra-op threads are set per thread
        try:
            self.train()
        except BaseException as error:  # noqa: BLE001  (handed to the main thread, which raises it)
            self.error = error
        finally:
            self.ended = True
            self.paused.release()

    def train(self) -> None:
        raise NotImplementedError

    # -- probes

    def timed(self, bucket: str, fn, *args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            end = clock()
            total = self.buckets[bucket]
            total[0] += end[0] - start[0]
            total[1] += end[1] - start[1]

    def timed_generate(self, generate):
        """``engine.generate`` timed as ``generation``, its forwards counted apart."""

        def generate_timed(*args, **kwargs):
            self.in_generation = True
            try:
                return self.timed("generation", generate, *args, **kwargs)
            finally:
                self.in_generation = False

        return generate_timed

    def count_policy(self, module, args) -> None:
        self.counts["generation" if self.in_generation else "outside"] += 1

    def count_reference(self, module, args) -> None:
        self.counts["reference"] += 1

    def begin_step(self, index: int) -> tuple[float, float]:
        """Reseed the shared generator (both sides of a pair alike), reset the probes, open the timed window."""
        torch.manual_seed(SEED + index)
        self.buckets = {name: [0.0, 0.0] for name in ("generation", "generate_and_score", "advantages")}
        self.counts = {"generation": 0, "outside": 0, "reference": 0, "log": 0}
        return clock()

    def add_iter(self, since_start: tuple[float, float]) -> None:
        now = clock()
        for i, c in enumerate(CLOCKS):
            self.run.iter_s[c].append(now[i] - since_start[i])

    def end_step(self, start: tuple[float, float]) -> None:
        end = clock()
        run, b = self.run, self.buckets
        for i, c in enumerate(CLOCKS):
            step = end[i] - start[i]
            generation = b["generation"][i]
            scoring = b["generate_and_score"][i] - generation + b["advantages"][i]
            run.step_s[c].append(step)
            run.generation_s[c].append(generation)
            run.scoring_s[c].append(scoring)
            run.training_s[c].append(step - generation - scoring)
        run.forwards_generation.append(self.counts["generation"])
        run.forwards_outside.append(self.counts["outside"])
        run.forwards_reference.append(self.counts["reference"])
        if self.variant.lightning:
            run.log_calls.append(self.counts["log"])

    def finish(self) -> Run:
        """Join the thread; then the conversions kept out of the timed loop (digests, counts)."""
        from ltpost.rollout.batch import pack_rollout

        self.thread.join()
        run = self.run
        if len(self.losses) != self.steps or len(self.scored) != self.steps:
            raise RuntimeError(f"{self.variant.name}: ran {len(self.losses)} steps, not {self.steps}")
        run.load_average = os.getloadavg()[0]
        digests = {name: hashlib.sha256() for name in ("prompt", "completion", "reward", "weights")}
        for prompts, scored in zip(self.prompts, self.scored):
            digests["prompt"].update(repr(list(prompts)).encode())
            digests["completion"].update(repr(scored.rollout.completion_ids).encode())
            digests["reward"].update(scored.rewards.numpy().tobytes())
            run.rewards.append(float(torch.nanmean(scored.rewards)))
            run.completion_tokens.append(sum(len(ids) for ids in scored.rollout.completion_ids))
            # The training batch's rows, re-packed here the way both sides packed it (a pure function).
            packed = pack_rollout(
                scored.prompt_ids,
                scored.rollout.completion_ids,
                0,
                self.kwargs["packing_row_tokens"],
                True,  # sdpa: shared
            )
            run.rows.append(packed["input_ids"].size(0))
        for name, tensor in self.model.state_dict().items():
            digests["weights"].update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        for name, digest in digests.items():
            setattr(run, f"{name}_digest", digest.hexdigest()[:16])
        run.losses = [float(loss) for loss in self.losses]
        return run


# -- the advantage and metric functions in the modules' namespaces report to the active run -------------------


def timed_in_modules():
    """Wrap ``group_advantages`` / ``rloo_advantages`` and ``rollout_metrics`` where the modules look them up, so an
    ltpost run times them as ``scoring`` (with the timer the raw loop uses); returns a function that undoes it."""
    from ltpost.modules import grpo, rloo

    originals = [
        (grpo, "group_advantages"),
        (grpo, "rollout_metrics"),
        (rloo, "rloo_advantages"),
        (rloo, "rollout_metrics"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in originals]

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            side = Active.side
            return fn(*args, **kwargs) if side is None else side.timed("advantages", fn, *args, **kwargs)

        return wrapper

    for module, name, fn in saved:
        setattr(module, name, timed(fn))

    def restore() -> None:
        for module, name, fn in saved:
            setattr(module, name, fn)

    return restore


# -- the raw loop ---------------------------------------------------------------------------------------------


class RawSide(Side):
    """The same training as ``GRPOModule`` / ``RLOOModule`` under Lightning, written out by hand."""

    def __init__(self, variant: Variant, args, datamodule, steps: int, round_index: int) -> None:
        super().__init__(variant, args, steps, round_index)
        self.datamodule = datamodule

    def train(self) -> None:
        from ltpost.losses.grpo import group_advantages, grpo_loss, rloo_advantages, rloo_kl, rloo_loss
        from ltpost.metrics import logs_at_step
        from ltpost.models import load_tokenizer, load_trainable_model
        from ltpost.optim import adamw_from_hparams
        from ltpost.rewards import reward_function_name
        from ltpost.rollout import SamplingParams
        from ltpost.rollout.batch import completion_logps, pack_rollout
        from ltpost.rollout.scoring import default_engine, generate_and_score, resolve_reward_funcs, rollout_metrics

        defaults = module_class(self.variant)(**self.kwargs)  # the module's own defaults for all the rest
        hp, share_prompts = defaults.hparams, defaults.share_prompts
        model = load_trainable_model(hp)
        tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)
        reward_funcs = resolve_reward_funcs(list(hp.reward_funcs))
        reward_names = [reward_function_name(f) for f in reward_funcs]
        engine = default_engine(model, tokenizer, hp.generation_batch_size)
        engine.generate = self.timed_generate(engine.generate)
        model.register_forward_pre_hook(self.count_policy)
        reference = None
        if hp.beta != 0:  # ReferenceModel(mode="copy"): a frozen copy loaded from the policy's source
            reference = load_trainable_model(hp, name=hp.ref_model or hp.model).eval()
            reference.requires_grad_(False)
            reference.register_forward_pre_hook(self.count_reference)
        optim = adamw_from_hparams(model, hp, self.steps)
        optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        params = SamplingParams(
            max_completion_length=hp.max_completion_length,
            num_generations=hp.num_generations,
            temperature=hp.temperature,
            top_p=hp.top_p,
            top_k=hp.top_k,
            min_p=hp.min_p,
            repetition_penalty=hp.repetition_penalty,
        )
        self.model, run, outer = model, self.run, None
        rounds = iter(self.datamodule.rounds(1, 1))  # the rounds Lightning reads: same seeded shuffle, epoch 0
        world, steps_per_generation = 1, 1
        for index in range(self.steps):
            batch = next(rounds)
            if outer is not None:  # the raw loop's whole per-step cost: step start to step start
                self.add_iter(outer)
            self.pause()
            outer = start = self.begin_step(index)

            scored = self.timed(
                "generate_and_score",
                generate_and_score,
                engine,
                tokenizer,
                reward_funcs,
                hp.reward_weights,
                batch,
                params,
            )
            rollout = scored.rollout
            rewards = scored.rewards  # [N] (the module moves it to its device: a no-op on CPU)
            packed = pack_rollout(
                scored.prompt_ids, rollout.completion_ids, tokenizer.pad_token_id, hp.packing_row_tokens, share_prompts
            )
            mask = packed["completion_mask"]  # [N, T]
            with_entropy = logs_at_step(index, LOG_EVERY_N_STEPS)  # the optimizer steps so far play global_step
            if self.variant.method == "grpo":
                advantages, metrics = self.timed(
                    "advantages", group_advantages, rewards, hp.num_generations, hp.scale_rewards
                )
                metrics = {**metrics, **self.timed("advantages", rollout_metrics, scored, reward_names)}
                # The round's completion tokens per micro-step and rank, as the module normalizes dapo.
                items = mask.sum().float() / (world * steps_per_generation)
                logps, entropies = completion_logps(
                    model, packed, hp.temperature, hp.logits_chunk_size, with_entropy=with_entropy
                )  # [N, T]
                loss, step_metrics = grpo_loss(
                    logps,
                    None,  # on-policy: no old-policy forward
                    None,
                    advantages,
                    mask,
                    loss_type=hp.loss_type,
                    beta=hp.beta,
                    epsilon=hp.epsilon,
                    epsilon_high=hp.epsilon_high,
                    delta=hp.delta,
                    importance_sampling_level=hp.importance_sampling_level,
                    max_completion_length=hp.max_completion_length,
                    num_items_in_batch=items,
                    entropy_mask=None,
                )
            else:
                penalty, kl_metrics = None, []
                if hp.beta != 0:
                    with torch.no_grad():
                        old_logps, _ = completion_logps(model, packed, hp.temperature, hp.logits_chunk_size)
                        with torch.inference_mode():  # as ReferenceModel.reference_values, then a clone
                            ref_logps, _ = completion_logps(reference, packed, hp.temperature, hp.logits_chunk_size)
                        ref_logps = ref_logps.clone()
                        kl, kl_metric = rloo_kl(old_logps, ref_logps, mask)  # [N]
                    penalty = hp.beta * torch.cat([kl])  # [N]
                    kl_metrics.append(kl_metric["kl"])
                advantages, metrics = self.timed(
                    "advantages",
                    rloo_advantages,
                    rewards,
                    hp.num_generations,
                    hp.normalize_advantages,
                    kl_penalty=penalty,
                )
                metrics = {**metrics, **self.timed("advantages", rollout_metrics, scored, reward_names)}
                if kl_metrics:
                    metrics["kl"] = torch.stack(kl_metrics).mean()
                logps, entropies = completion_logps(
                    model, packed, hp.temperature, hp.logits_chunk_size, with_entropy=with_entropy
                )  # [N, T]
                loss, step_metrics = rloo_loss(
                    logps, None, advantages, mask, epsilon=hp.epsilon, epsilon_high=hp.epsilon_high
                )
            if entropies is not None:
                completion = mask.to(entropies.dtype)  # [N, T]
                step_metrics["entropy"] = (entropies * completion).sum() / completion.sum().clamp(min=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.end_step(start)
            self.losses.append(step_metrics["loss"])
            self.prompts.append(batch["example_index"])
            self.scored.append(scored)
            if entropies is not None:
                run.entropy_steps.append(index)


# -- the ltpost run -------------------------------------------------------------------------------------------


class LightningSide(Side):
    """``trainer.fit`` with a callback that pauses at every ``on_train_batch_start`` and probes the module."""

    def __init__(self, variant: Variant, args, datamodule, steps: int, round_index: int, log_dir: str) -> None:
        super().__init__(variant, args, steps, round_index)
        self.datamodule, self.log_dir = datamodule, log_dir

    def instrument(self, trainer, module) -> None:
        """Before the first step: timers on the engine's ``generate`` and the module's ``generate_and_score``
        (instance attributes), a counter on ``module.log``, forward counters on the policy and the reference."""
        from ltpost import ReferenceModel

        side = self
        engine = module.rollout_engine
        engine.generate = self.timed_generate(engine.generate)
        generate_and_score = module.generate_and_score

        def generate_and_score_timed(*args, **kwargs):
            return side.timed("generate_and_score", generate_and_score, *args, **kwargs)

        module.generate_and_score = generate_and_score_timed
        log = module.log

        def log_counted(*args, **kwargs):
            side.counts["log"] += 1
            return log(*args, **kwargs)

        module.log = log_counted
        module.model.register_forward_pre_hook(self.count_policy)
        for callback in trainer.callbacks:
            if isinstance(callback, ReferenceModel) and callback.reference is not None:
                callback.reference.register_forward_pre_hook(self.count_reference)
        self.model = module.model

    def train(self) -> None:
        from lightning.pytorch import Callback, Trainer

        side, run = self, self.run

        class Lockstep(Callback):
            window: tuple[float, float] | None = None  # when this batch's timed window began

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if self.window is None:  # every callback's on_fit_start has run: the reference exists
                    side.instrument(trainer, pl_module)
                else:  # Lightning's whole per-step cost: batch start to batch start
                    side.add_iter(self.window)
                side.pause()
                self.window = side.begin_step(batch_idx)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                side.end_step(self.window)
                side.losses.append(outputs["loss"].detach())
                side.prompts.append(batch["example_index"])
                if "entropy" in outputs:  # training_step returns the metrics it computed
                    run.entropy_steps.append(batch_idx)

        module = module_class(self.variant)(**self.kwargs)
        original = module.generate_and_score

        def keep_scored(*args, **kwargs):  # the round's completions and rewards, for the checks after the run
            scored = original(*args, **kwargs)
            side.scored.append(scored)
            return scored

        module.generate_and_score = keep_scored  # wrapped again (timer outside) by instrument()
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=self.steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            log_every_n_steps=LOG_EVERY_N_STEPS,
            callbacks=[Lockstep()],
            default_root_dir=self.log_dir,
        )
        trainer.fit(module, datamodule=self.datamodule)


# -- one round: all variants in lockstep ----------------------------------------------------------------------


def make_data(args: argparse.Namespace, steps: int):
    """``datamodule()``: a fresh ``PromptDataModule`` (one per run) over prompts tokenized once."""
    from ltpost import PromptDataModule

    common = {
        **DATA_KWARGS,
        "tokenizer": args.model,
        "prompts_per_step": args.batch_size,
        "max_train_samples": steps * args.batch_size,
    }
    source = PromptDataModule(**common)
    source.setup("fit")

    def datamodule() -> PromptDataModule:
        fresh = PromptDataModule(**common)  # setup() skips whatever is already set: no second tokenization
        fresh.tokenizer, fresh.train_dataset = source.tokenizer, source.train_dataset
        return fresh

    return datamodule


def step_order(sides: list, index: int) -> list:
    """Forward on even steps, backward on odd ones (every pair swaps who goes first), rotated every two steps."""
    shift = (index // 2) % len(sides)
    order = sides[shift:] + sides[:shift]
    return order if index % 2 == 0 else order[::-1]


def run_round(variants, args, datamodule, steps: int, round_index: int, log_dir: str) -> list[Run]:
    """Set every run up one after the other, then train them all one step each in turn."""
    gc.collect()  # start every round from the same heap state; gc stays on, it is part of real training
    sides = [
        LightningSide(v, args, datamodule(), steps, round_index, log_dir)
        if v.lightning
        else RawSide(v, args, datamodule(), steps, round_index)
        for v in variants
    ]

    def timed(side, call, *call_args) -> None:  # a run's fit time: only what it spent itself
        before = clock()
        call(*call_args)
        for name, value in since(before).items():
            side.run.fit_s[name] += value

    for side in sides:
        timed(side, side.start)
    for index in range(steps):
        for side in step_order(sides, index):
            timed(side, side.turn, index)
    return [side.finish() for side in sides]


def measure(variants, args, datamodule, log_dir: str) -> list[Run]:
    """An untimed warm-up round (first-use costs: lazy imports, allocator growth), then ``--rounds`` rounds."""
    if not args.quick:
        run_round(variants, args, datamodule, 2, -1, log_dir)
    runs = []
    for r in range(args.rounds):
        mine = {run.variant: run for run in run_round(variants, args, datamodule, args.steps, r, log_dir)}
        runs += mine.values()
        cells = []
        for v in variants:
            if v.baseline is None:
                continue
            ours, base = mine[v.name], mine[v.baseline]
            total = paired_median(ours.step_s["cpu"], base.step_s["cpu"], args.warmup)
            outside = paired_median(outside_s(ours, "cpu"), outside_s(base, "cpu"), args.warmup)
            cells.append(f"{v.pair} x{total:.3f} (outside generation x{outside:.3f})")
        load = max(run.load_average for run in mine.values())
        print(f"  round {r}  paired CPU ratio ltpost/raw: " + ", ".join(cells) + f"   load {load:.2f}", flush=True)
    return runs


# -- summary and checks ---------------------------------------------------------------------------------------


def outside_s(run: Run, c: str) -> list[float]:
    """Per step: the step's time outside ``engine.generate`` (scoring + training)."""
    return [s - g for s, g in zip(run.step_s[c], run.generation_s[c])]


def paired_median(ours: list[float], base: list[float], warmup: int) -> float:
    return statistics.median(a / b for a, b in zip(ours[warmup:], base[warmup:]))


PHASES = ("generation", "scoring", "training")


def series(run: Run, key: str, c: str) -> list[float]:
    return outside_s(run, c) if key == "outside" else getattr(run, f"{key}_s")[c]


def summarize(variants, runs: list[Run], warmup: int) -> dict:
    """Medians per variant and clock over the measured steps of every round; phase shares; forward counts."""
    summary = {}
    for variant in variants:
        mine = sorted((run for run in runs if run.variant == variant.name), key=lambda run: run.round)
        measured = [i for run in mine for i in range(warmup, len(run.losses))]
        entry = {
            "pair": variant.pair,
            "method": variant.method,
            "lightning": variant.lightning,
            "beta": variant.beta,
            # Per step, the same in every round (same seed per step): all steps, warm-up included.
            "forwards_generation_per_step": mine[0].forwards_generation,
            "forwards_outside_per_step": mine[0].forwards_outside,
            "forwards_reference_per_step": mine[0].forwards_reference,
            "rows_per_step": mine[0].rows,
            "completion_tokens_per_step": statistics.mean(t for run in mine for t in run.completion_tokens[warmup:]),
            "reward_mean": statistics.mean(r for run in mine for r in run.rewards[warmup:]),
            "measured_steps": len(measured),
        }
        if variant.lightning:
            entry["log_calls_per_step"] = mine[0].log_calls
        for c in CLOCKS:
            timings = {}
            for key in ("step", "iter", *PHASES, "outside"):
                values = [v for run in mine for v in series(run, key, c)[warmup:]]
                timings[f"{key}_s"] = statistics.median(values)
            steps_total = sum(sum(run.step_s[c][warmup:]) for run in mine)
            for phase in PHASES:  # share of the measured steps' total time
                timings[f"{phase}_share"] = (
                    sum(sum(getattr(run, f"{phase}_s")[c][warmup:]) for run in mine) / steps_total
                )
            timings["step_s_per_round"] = [statistics.median(run.step_s[c][warmup:]) for run in mine]
            timings["fit_s"] = statistics.median(run.fit_s[c] for run in mine)
            entry[c] = timings
        summary[variant.name] = entry
    return summary


def summarize_pairs(variants, runs: list[Run], warmup: int) -> dict:
    """For each pair, ltpost / raw per clock: paired per-step medians of the total, of the time outside generation
    and of each phase; ratios of the measured steps' sums; the paired medians per round."""
    pairs = {}
    for variant in variants:
        if variant.baseline is None:
            continue
        ours = sorted((run for run in runs if run.variant == variant.name), key=lambda run: run.round)
        theirs = sorted((run for run in runs if run.variant == variant.baseline), key=lambda run: run.round)
        entry = {"ltpost": variant.name, "raw": variant.baseline}
        for c in CLOCKS:
            ratios = {}
            for key in ("step", "outside", *PHASES):
                per_round = [
                    [a / b for a, b in zip(series(o, key, c)[warmup:], series(t, key, c)[warmup:])]
                    for o, t in zip(ours, theirs)
                ]
                name = "total" if key == "step" else key
                ratios[f"{name}_paired"] = statistics.median(r for rnd in per_round for r in rnd)
                if key in ("step", "outside"):
                    ratios[f"{name}_paired_per_round"] = [statistics.median(rnd) for rnd in per_round]
                    ratios[f"{name}_sum"] = sum(sum(series(o, key, c)[warmup:]) for o in ours) / sum(
                        sum(series(t, key, c)[warmup:]) for t in theirs
                    )
            entry[c] = ratios
        pairs[variant.pair] = entry
    return pairs


def check_same_work(variants, runs: list[Run]) -> dict:
    """Each ltpost run and its raw loop: same prompts, completions and rewards; bit-identical losses and final
    weights; entropy on the same steps; no more forwards outside generation than the raw loop, and without a KL
    term none besides one training forward per packed row."""
    checks = {}
    for variant in (v for v in variants if v.baseline is not None):
        ours = sorted((run for run in runs if run.variant == variant.name), key=lambda run: run.round)
        theirs = sorted((run for run in runs if run.variant == variant.baseline), key=lambda run: run.round)
        both = ours + theirs
        mismatched = [
            (run.round, step)
            for run, base in zip(ours, theirs)
            for step, (a, b) in enumerate(zip(run.losses, base.losses))
            if a != b
        ]
        expected_outside = 2 if variant.beta != 0 else 1  # per row: (old-policy forward +) training forward
        check = {
            "ltpost": variant.name,
            "raw": variant.baseline,
            "identical_prompts": len({run.prompt_digest for run in both}) == 1,
            "identical_completions": len({run.completion_digest for run in both}) == 1,
            "identical_rewards": len({run.reward_digest for run in both}) == 1,
            "losses_bitwise_equal": not mismatched,
            "max_abs_loss_diff": max(
                abs(a - b) for run, base in zip(ours, theirs) for a, b in zip(run.losses, base.losses)
            ),
            "final_weights_equal": all(run.weights_digest == base.weights_digest for run, base in zip(ours, theirs)),
            "first_step_loss": {"ltpost": ours[0].losses[0], "raw": theirs[0].losses[0]},
            "same_entropy_steps": all(run.entropy_steps == base.entropy_steps for run, base in zip(ours, theirs)),
            "entropy_steps": ours[0].entropy_steps,
            "steps_compared": sum(len(run.losses) for run in ours),
            "forwards_equal": all(
                (run.forwards_generation, run.forwards_outside, run.forwards_reference)
                == (base.forwards_generation, base.forwards_outside, base.forwards_reference)
                for run, base in zip(ours, theirs)
            ),
            "ltpost_extra_forwards_outside_generation": max(
                a - b for run, base in zip(ours, theirs) for a, b in zip(run.forwards_outside, base.forwards_outside)
            ),
            "forwards_outside_per_row": expected_outside,
            "no_wasted_forward": all(
                run.forwards_outside == [expected_outside * rows for rows in run.rows]
                and run.forwards_reference == [rows if variant.beta != 0 else 0 for rows in run.rows]
                for run in both
            ),
        }
        checks[variant.pair] = check
        failures = [
            key
            for key in (
                "identical_prompts",
                "identical_completions",
                "identical_rewards",
                "losses_bitwise_equal",
                "final_weights_equal",
                "same_entropy_steps",
            )
            if not check[key]
        ]
        if failures:
            raise RuntimeError(
                f"{variant.name} vs {variant.baseline}: {', '.join(failures)} failed (losses differ at (round, step) "
                f"{mismatched[:5]}, max |diff| {check['max_abs_loss_diff']:.1e}): the two loops do different work."
            )
        if check["ltpost_extra_forwards_outside_generation"] > 0 or not check["no_wasted_forward"]:
            raise RuntimeError(
                f"{variant.name}: forwards outside generation per step {ours[0].forwards_outside} (reference "
                f"{ours[0].forwards_reference}) for {ours[0].rows} packed rows; {variant.baseline} does "
                f"{theirs[0].forwards_outside} ({theirs[0].forwards_reference}): a forward is wasted."
            )
    return checks


def markdown_tables(summary: dict, pairs: dict) -> str:
    def both(values: dict, key: str, scale: float = 1e3, fmt: str = ".0f") -> str:
        return " / ".join(f"{scale * values[c][key]:{fmt}}" for c in CLOCKS)

    lines = [
        "Median per step, `wall / CPU` ms. `outside gen` = scoring + training (the step minus `engine.generate`);",
        "shares are of the measured steps' total CPU time. Forwards per step (first step): policy forwards inside",
        "generation / outside it (training, old log-probs) / reference model; rows = packed training rows.",
        "",
        (
            "| variant | step | iter | generation | scoring | training | outside gen | share gen / score / train "
            "| forwards gen / outside / ref | rows | log calls | reward | fit s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        shares = " / ".join(f"{s['cpu'][f'{p}_share']:.0%}" for p in PHASES)
        forwards = (
            f"{s['forwards_generation_per_step'][0]} / {s['forwards_outside_per_step'][0]} / "
            f"{s['forwards_reference_per_step'][0]}"
        )
        cells = (
            name,
            both(s, "step_s"),
            both(s, "iter_s"),
            both(s, "generation_s"),
            both(s, "scoring_s", fmt=".1f"),
            both(s, "training_s"),
            both(s, "outside_s"),
            shares,
            forwards,
            str(s["rows_per_step"][0]),
            str(s["log_calls_per_step"][-1]) if "log_calls_per_step" in s else "—",
            f"{s['reward_mean']:.3f}",
            both(s, "fit_s", 1, ".1f"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ltpost / raw loop on the same prompts and completions, `wall / CPU`: `paired` is the median of the per-step",
        "ratios (step i of both ran back to back), `sum` the ratio of the measured steps' totals.",
        "",
        (
            "| pair | total paired | total sum | outside gen paired | outside gen sum | outside gen paired per round (CPU) "
            "| generation paired | scoring paired | training paired |"
        ),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, p in pairs.items():
        per_round = ", ".join(f"{r:.3f}" for r in p["cpu"]["outside_paired_per_round"])
        keys = ("total_paired", "total_sum", "outside_paired", "outside_sum")
        cells = [name, *(both(p, key, 1, ".3f") for key in keys), per_round]
        cells += [both(p, f"{phase}_paired", 1, ".3f") for phase in PHASES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = common_parser(__doc__.split("\n\n")[0], steps=8, warmup=2, batch_help="prompts per step")
    parser.add_argument("--model", default=MODEL, help="the policy (e.g. ltpost:tiny-llama-sft once shipped)")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=8, help="most tokens per completion")
    parser.add_argument(
        "--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)} (default: all)"
    )
    args = parse_common(parser, argv)
    args.pairs = [name.strip() for name in args.pairs.split(",") if name.strip()]
    unknown = set(args.pairs) - set(PAIRS)
    if unknown or not args.pairs:
        parser.error(f"--pairs: unknown {sorted(unknown)}; choose from {', '.join(PAIRS)}")
    if args.output is None and not args.quick:
        args.output = RESULT
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    env = environment()
    variants = tuple(v for v in ALL_VARIANTS if v.pair in args.pairs)
    print(
        f"{args.rounds} round(s) x {len(variants)} runs in lockstep x {args.steps} steps, first {args.warmup} "
        f"discarded; {args.batch_size} prompts x {args.num_generations} generations of <= "
        f"{args.max_completion_length} tokens per step, model {args.model}",
        flush=True,
    )

    restore = timed_in_modules()
    try:
        with tempfile.TemporaryDirectory(prefix="ltpost-bench-") as scratch:
            # A fresh cache: the built-in model is materialized from the current code, never read from a folder
            # that an older version of the tokenizer or config left in ~/.cache/ltpost.
            os.environ["LTPOST_CACHE"] = str(Path(scratch) / "cache")
            datamodule = make_data(args, args.steps)
            runs = measure(variants, args, datamodule, scratch)
    finally:
        restore()
    checks = check_same_work(variants, runs)
    summary = summarize(variants, runs, args.warmup)
    pairs = summarize_pairs(variants, runs, args.warmup)
    env["total_s"] = time.perf_counter() - started

    print()
    print(markdown_tables(summary, pairs))
    print()
    for check in checks.values():
        print(
            f"{check['ltpost']} vs {check['raw']}: same prompts {check['identical_prompts']}, completions "
            f"{check['identical_completions']}, rewards {check['identical_rewards']}; losses bitwise equal on all "
            f"{check['steps_compared']} steps {check['losses_bitwise_equal']} (first {check['first_step_loss']['raw']:.6g})"
            f", final weights equal {check['final_weights_equal']}, entropy on the same steps "
            f"{check['same_entropy_steps']} ({check['entropy_steps']}); forwards equal {check['forwards_equal']}, "
            f"{check['forwards_outside_per_row']} per packed row outside generation {check['no_wasted_forward']}"
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
            "dataset": DATASET,
            "seed": SEED,
            "log_every_n_steps": LOG_EVERY_N_STEPS,
            "reward_funcs": [f if isinstance(f, str) else f.__name__ for f in REWARD_FUNCS],
            "grpo": {k: v for k, v in GRPO_KWARGS.items() if k != "reward_funcs"},
            "rloo": {k: v for k, v in COMMON_KWARGS.items() if k != "reward_funcs"},
            "rloo_kl_beta": KL_BETA,
            "data": DATA_KWARGS,
        },
        "env": env,
        "checks": checks,
        "summary": summary,
        "pairs": pairs,
        "runs": [asdict(run) for run in runs],
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
