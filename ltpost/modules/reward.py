"""RewardModule: a Bradley-Terry reward model (a sequence classifier with one output) trained on preference pairs."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from ltpost.losses.reward import bradley_terry_loss
from ltpost.metrics import health_callbacks, is_logging_step, log_grad_norm, log_padding_fraction
from ltpost.models import Dtype, load_tokenizer, load_trainable_model
from ltpost.optim import adamw_from_hparams


def sequence_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """One scalar per sequence, ``[2B]`` (chosen first, then rejected), read at each sequence's last token.

    The backbone's hidden states are scored at ``sequence_ends`` for padded and padding-free batches alike. (The
    classifier's own pooling would read only the last sequence of a padding-free row, and with ``pad == eos``
    it would skip each sequence's final EOS.) Hugging Face classifiers on decoder models name the head ``score``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,  # required for padding-free rows (see SFTModule.forward)
    ).last_hidden_state  # [R, T, H]
    ends = hidden.reshape(-1, hidden.shape[-1])[batch["sequence_ends"]]  # [2B, H]
    return base.score(ends).squeeze(-1).float()  # [2B]


class RewardModule(LightningModule):
    """Reward modeling: a classifier with one output trained so chosen responses outscore rejected ones.

    Pair it with ``ltpost.PreferenceDataModule``. The model is ``AutoModelForSequenceClassification`` with
    ``num_labels=1`` (a causal LM checkpoint gets a freshly initialized ``score`` head). Export it with
    ``HFExport``; the folder then serves as a learned reward (``AutoModelForSequenceClassification``).
    Metrics under ``train/`` and ``eval/``: ``loss``, ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``,
    ``max_reward``, and ``num_tokens``.

    Args:
        model: hub id, local path or built-in name of the backbone (a causal LM or a classifier).
        center_rewards_coefficient: weight of ``mean((r_c + r_r)^2)``, which keeps rewards centered (None: off).
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
        use_peft: train LoRA adapters (the ``score`` head is trained in full).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        lora_modules_to_save: modules trained in full beside the adapters (peft adds the ``score`` head itself).
        use_rslora: rank-stabilized LoRA scaling.
        use_dora: weight-decomposed LoRA (DoRA).
        load_in_4bit: QLoRA: 4-bit NF4 base weights (implies LoRA).
        load_in_8bit: 8-bit base weights (implies LoRA).
        training_health: add the ``TrainingHealth`` callback (warnings with evidence and actions, ``health.jsonl``)
            unless the trainer has one; False turns it off.
    """

    def __init__(
        self,
        model: str = "ltpost:tiny-llama",
        center_rewards_coefficient: float | None = None,
        learning_rate: float = 1e-5,
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
        training_health: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        self.model = None
        self.tokenizer = None
        self.num_tokens = 0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_trainable_model(hp, task="sequence-classification")
        self.tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen_rewards [B], rejected_rewards [B])`` for a batch from ``collate_preference``."""
        scores = sequence_scores(self.model, batch)  # [2B]
        return scores[: batch["num_pairs"]], scores[batch["num_pairs"] :]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        chosen, rejected = self(batch)  # [B], [B]
        loss, metrics = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), self.hparams.center_rewards_coefficient
        )
        self.num_tokens += batch["num_tokens"]
        log_padding_fraction(self, batch)
        log_all = is_logging_step(self)  # each self.log costs ~0.4 ms: diagnostics only when written (ltpost.metrics)
        for name, value in metrics.items():
            if log_all or name == "loss":
                self.log(f"train/{name}", value, prog_bar=name in ("loss", "accuracy"), batch_size=batch["num_pairs"])
        if log_all:
            self.log("train/num_tokens", float(self.num_tokens), reduce_fx="sum", sync_dist=True, batch_size=1)
        return {"loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, prefix: str, batch: dict[str, Any]) -> None:
        chosen, rejected = self(batch)  # [B], [B]
        _, metrics = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.hparams.center_rewards_coefficient)
        for name, value in metrics.items():
            # min/max over the split need min/max reductions; the rest are pair-weighted means.
            reduce_fx = {"min_reward": "min", "max_reward": "max"}.get(name, "mean")
            self.log(
                f"{prefix}/{name}",
                value,
                on_epoch=True,
                sync_dist=True,
                reduce_fx=reduce_fx,
                batch_size=batch["num_pairs"],
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm(self)  # train/grad_norm on logging steps (before clipping), read by TrainingHealth

    def configure_callbacks(self) -> list:
        return health_callbacks(self)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_from_hparams(self.model, self.hparams, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ltpost_num_tokens"] = self.num_tokens

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.num_tokens = checkpoint.get("ltpost_num_tokens", 0)
