"""DPOModule: direct preference optimization and its variants, with the reference served by a callback."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from ltpost.callbacks.reference_model import ReferenceModel
from ltpost.losses.dpo import (
    DPO_LOSSES,
    F_DIVERGENCES,
    PreferenceLogps,
    log_sum_sq_probs,
    sequence_logps,
    wpo_weights,
)
from ltpost.losses.dpo import dpo_loss as compute_dpo_loss
from ltpost.losses.logprobs import selective_log_softmax
from ltpost.metrics import health_callbacks, is_logging_step, log_grad_norm, log_padding_fraction
from ltpost.models import Dtype, load_tokenizer, load_trainable_model
from ltpost.optim import adamw_from_hparams

IGNORE_INDEX = -100


class DPOModule(LightningModule):
    """Direct Preference Optimization (and IPO, hinge, robust, BCO, SPPO, AOT, APO, DiscoPOP, ... by ``loss_type``).

    Pair it with ``ltpost.PreferenceDataModule``: chosen and rejected sequences arrive in one batch and go through
    one forward. Reference log-probs come from the ``ReferenceModel`` callback; unless you configure one, the
    module adds ``ReferenceModel(mode="auto")``, which for a LoRA policy disables the adapters (no second model)
    and otherwise precomputes the reference log-probs once before training (no second model during training).
    Metrics use TRL's names under ``train/`` and ``eval/``: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``,
    ``logits/rejected``, ``num_tokens``.

    Args:
        model: the policy: hub id, local path (e.g. an SFT export) or built-in name.
        ref_model: a separate reference checkpoint; default: the policy's initial weights.
        loss_type: one of ``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``,
            ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``,
            ``sigmoid_norm`` (length-normalized sigmoid), or a list of them combined with ``loss_weights`` (MPO).
        loss_weights: weight of each entry of ``loss_type`` (default 1.0 each).
        beta: inverse temperature of the implicit reward ``beta * (log pi - log pi_ref)``.
        label_smoothing: assumed probability that a preference label is flipped (cDPO / robust / exo_pair).
        f_divergence_type: divergence regularizing the policy: ``reverse_kl`` (DPO), ``forward_kl``,
            ``js_divergence`` or ``alpha_divergence``.
        f_alpha_divergence_coef: alpha of ``alpha_divergence``.
        use_weighting: WPO: weight each pair by the policy's (length-normalized) probability of both responses.
        ld_alpha: LD-DPO: weight of the tokens past the shorter response's length (None: off; 1.0 is plain DPO).
        discopop_tau: temperature of the DiscoPOP loss.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not on biases and norms).
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        lr_scheduler_type: ``linear``, ``cosine``, ``constant`` or ``constant_with_warmup``.
        warmup_steps: optimizer steps of linear warmup; overrides ``warmup_ratio`` when > 0.
        warmup_ratio: warmup as a fraction of the run's optimizer steps.
        dtype: dtype the weights are loaded in.
        attn_implementation: attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...).
        model_revision: hub revision of the model.
        trust_remote_code: allow code from the model's repository to run.
        gradient_checkpointing: recompute activations in the backward pass.
        use_peft: train LoRA adapters; the reference is then the same model with adapters disabled.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        lora_modules_to_save: modules trained in full beside the adapters.
        use_rslora: rank-stabilized LoRA scaling.
        use_dora: weight-decomposed LoRA (DoRA).
        load_in_4bit: QLoRA: 4-bit NF4 base weights (implies LoRA).
        load_in_8bit: 8-bit base weights (implies LoRA).
        logits_chunk_size: rows per chunk when computing log-probs (bounds memory on large vocabularies).
        training_health: add the ``TrainingHealth`` callback (warnings with evidence and actions, ``health.jsonl``)
            unless the trainer has one; False turns it off.
    """

    def __init__(
        self,
        model: str = "ltpost:tiny-llama",
        ref_model: str | None = None,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        discopop_tau: float = 0.05,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        dtype: Dtype = "float32",
        attn_implementation: str | None = "sdpa",
        model_revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        use_peft: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = "all-linear",
        lora_modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        logits_chunk_size: int = 4096,
        training_health: bool = True,
    ) -> None:
        super().__init__()
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        unknown = [name for name in loss_types if name not in DPO_LOSSES]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}; choose from {sorted(DPO_LOSSES)}.")
        if loss_weights is not None and len(loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types; give one each."
            )
        if f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; choose from {sorted(F_DIVERGENCES)}.")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}.")
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1] (or None), got {ld_alpha}.")
        self.save_hyperparameters()
        self.model_name = model
        self.reference_model_name = ref_model
        self.loss_types = loss_types
        self.model = None
        self.tokenizer = None
        self.num_tokens = 0

    # -- model and reference -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_trainable_model(hp)
        self.tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)

    def build_reference_model(self, name: str | None) -> torch.nn.Module:
        """A fresh reference (for ``ReferenceModel`` in ``copy`` mode): ``name``, or the policy's source weights."""
        return load_trainable_model(self.hparams, name=name or self.hparams.model)

    def configure_callbacks(self) -> list:
        callbacks = health_callbacks(self)
        if any(isinstance(c, ReferenceModel) for c in self.trainer.callbacks):
            return callbacks  # the user configured one: Lightning would otherwise replace it with ours
        return [ReferenceModel(mode="auto", model=self.hparams.ref_model), *callbacks]

    @property
    def reference(self) -> ReferenceModel:
        found = [c for c in self.trainer.callbacks if isinstance(c, ReferenceModel)]
        if not found:
            raise RuntimeError(
                "DPOModule needs a ReferenceModel callback; it adds one itself unless callbacks were replaced."
            )
        return found[0]

    # -- log-probs -----------------------------------------------------------------------------------------------

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Any], with_weights: bool = False):
        """Per-sequence completion log-probs ``[2B]`` (chosen first), plus what the loss and metrics need."""
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,  # required for padding-free rows (see SFTModule.forward)
        ).logits  # [R, T, V]
        labels = batch["shift_labels"]  # [R, T]
        mask = labels != IGNORE_INDEX  # [R, T]
        token_logps = (
            selective_log_softmax(logits, labels.clamp(min=0), self.hparams.logits_chunk_size) * mask
        )  # [R, T]
        num_sequences = 2 * batch["num_pairs"]
        public = None
        if self.hparams.ld_alpha is not None:
            public = torch.minimum(batch["chosen_lengths"], batch["rejected_lengths"]).repeat(2)  # [2B]
        logps, lengths = sequence_logps(
            token_logps, mask, batch["sequence_ids"], num_sequences, self.hparams.ld_alpha, public
        )  # [2B], [2B]
        if not with_weights:
            return logps, lengths, None
        extras: dict[str, Tensor] = {}
        with torch.no_grad():
            mean_logits = logits.detach().mean(-1) * mask  # [R, T]
            extras["logit_sums"] = torch.zeros(num_sequences, device=logits.device).index_add_(
                0, batch["sequence_ids"].clamp(min=0).flatten(), mean_logits.flatten().float()
            )  # [2B]
        if self.hparams.use_weighting:
            token_norms = log_sum_sq_probs(logits, self.hparams.logits_chunk_size)  # [R, T]
            weights = wpo_weights(token_logps.detach(), token_norms, mask, batch["sequence_ids"], num_sequences)  # [2B]
            extras["wpo_weights"] = weights[: batch["num_pairs"]] * weights[batch["num_pairs"] :]  # [B]
        if self.hparams.ld_alpha is not None and "sft" in self.loss_types:
            extras["plain_logps"], _ = sequence_logps(token_logps, mask, batch["sequence_ids"], num_sequences)  # [2B]
        return logps, lengths, extras

    def reference_compute(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        """``[B, 2]`` (chosen, rejected) log-probs under ``model``; the ReferenceModel callback calls this."""
        logps, _, _ = self.sequence_logps(model, batch)  # [2B]
        return torch.stack([logps[: batch["num_pairs"]], logps[batch["num_pairs"] :]], dim=-1)  # [B, 2]

    # -- steps ---------------------------------------------------------------------------------------------------

    def _loss(self, batch: dict[str, Any], split: str) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = batch["num_pairs"]
        logps, lengths, extras = self.sequence_logps(self.model, batch, with_weights=True)  # [2B]
        reference = self.reference.reference_values(self, batch, self.reference_compute, split)  # [B, 2]
        inputs = PreferenceLogps(
            chosen=logps[:pairs],
            rejected=logps[pairs:],
            ref_chosen=reference[:, 0],
            ref_rejected=reference[:, 1],
            chosen_lengths=lengths[:pairs],
            rejected_lengths=lengths[pairs:],
        )
        hp = self.hparams
        plain = extras.get("plain_logps")
        loss, metrics = compute_dpo_loss(
            inputs,
            loss_type=self.loss_types,
            loss_weights=hp.loss_weights,
            beta=hp.beta,
            label_smoothing=hp.label_smoothing,
            f_divergence_type=hp.f_divergence_type,
            f_alpha_divergence_coef=hp.f_alpha_divergence_coef,
            use_weighting=hp.use_weighting,
            wpo_weights=extras.get("wpo_weights"),
            discopop_tau=hp.discopop_tau,
            sft_chosen_logps=plain[:pairs] if plain is not None else None,
        )
        token_counts = lengths.clamp(min=1).float()  # [2B]
        metrics["logits/chosen"] = extras["logit_sums"][:pairs].sum() / token_counts[:pairs].sum()
        metrics["logits/rejected"] = extras["logit_sums"][pairs:].sum() / token_counts[pairs:].sum()
        return loss, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        loss, metrics = self._loss(batch, "train")
        self.num_tokens += batch["num_tokens"]
        log_padding_fraction(self, batch)
        log_all = is_logging_step(self)  # each self.log costs ~0.4 ms: diagnostics only when written (ltpost.metrics)
        for name, value in metrics.items():
            if log_all or name == "loss":
                self.log(
                    f"train/{name}",
                    value,
                    prog_bar=name in ("loss", "rewards/accuracies"),
                    batch_size=batch["num_pairs"],
                )
        if log_all:
            self.log("train/num_tokens", float(self.num_tokens), reduce_fx="sum", sync_dist=True, batch_size=1)
        return {"loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, prefix: str, batch: dict[str, Any]) -> None:
        _, metrics = self._loss(batch, "eval")
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, on_epoch=True, sync_dist=True, batch_size=batch["num_pairs"])

    # -- optimization and state ----------------------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm(self)  # train/grad_norm on logging steps (before clipping), read by TrainingHealth

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_from_hparams(self.model, self.hparams, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ltpost_num_tokens"] = self.num_tokens

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.num_tokens = checkpoint.get("ltpost_num_tokens", 0)
