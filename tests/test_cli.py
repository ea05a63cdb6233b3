"""CLI: every shipped YAML parses; overrides, typos, --help and --print_config behave as users expect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

import ltpost
from ltpost.cli import LtpostCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


class ParseOnlyCLI(LtpostCLI):
    """Parses and validates a config (class paths resolve, every key is known) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def test_there_are_configs_to_check():
    assert any(p.name == "sft.yaml" for p in CONFIGS), CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = ParseOnlyCLI(args=["--config", str(config)], run=False)
    assert cli.config["model"]["class_path"].startswith(("ltpost.", "__main__"))
    assert cli.config["data"]["class_path"].startswith("ltpost.")


def test_cpu_configs_instantiate_without_training(tmp_path, monkeypatch):
    """The embedded-default config builds a real Trainer, module and datamodule (the model itself is lazy)."""
    monkeypatch.chdir(tmp_path)
    cli = LtpostCLI(args=["--config", str(REPO / "configs" / "sft.yaml")], run=False)
    assert isinstance(cli.trainer, Trainer)
    assert isinstance(cli.model, ltpost.SFTModule) and cli.model.model is None
    assert isinstance(cli.datamodule, ltpost.SFTDataModule)
    assert any(isinstance(c, ltpost.HFExport) for c in cli.trainer.callbacks)


def test_dotted_overrides_reach_the_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LtpostCLI(
        args=[
            "--config",
            str(REPO / "configs" / "sft.yaml"),
            "--trainer.max_steps",
            "10",
            "--model.init_args.learning_rate",
            "2e-5",
            "--model.init_args.loss_type",
            "dft",
            "--data.init_args.batch_size",
            "3",
        ],
        run=False,
    )
    assert cli.trainer.max_steps == 10
    assert cli.model.hparams.learning_rate == 2e-5 and cli.model.hparams.loss_type == "dft"
    assert cli.datamodule.batch_size == 3


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltpost", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_typo_in_yaml_key_is_rejected_by_name(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  class_path: ltpost.SFTModule\n  init_args:\n    lerning_rate: 1.0e-4\n")
    result = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr and "not accepted" in result.stderr


def test_typo_in_trainer_flag_is_rejected_by_name(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "configs" / "sft.yaml"), "--trainer.max_step", "3", cwd=tmp_path)
    assert result.returncode != 0
    assert "trainer.max_step" in result.stderr


def test_wrong_value_type_is_rejected(tmp_path):
    result = run_cli(
        "fit", "--config", str(REPO / "configs" / "sft.yaml"), "--model.init_args.loss_type", "mse", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "loss_type" in result.stderr and "nll" in result.stderr


def test_help_shows_argument_docstrings(tmp_path):
    result = run_cli("fit", "--model.help", "ltpost.SFTModule", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "peak learning rate of AdamW" in text
    assert "QLoRA: load the base weights in 4-bit NF4" in text


def test_print_config_round_trips(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "configs" / "sft.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "class_path: ltpost.SFTModule" in result.stdout
    (tmp_path / "printed.yaml").write_text(result.stdout)
    again = run_cli("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout


@pytest.mark.slow
def test_fit_validate_and_predict_from_the_command_line(tmp_path):
    """``python -m ltpost fit`` trains, writes TensorBoard events and an HF folder; validate and predict run."""
    common = ["--config", str(REPO / "configs" / "sft.yaml"), "--data.init_args.max_eval_samples", "16"]
    result = run_cli("fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (tmp_path / "outputs" / "sft-arithmetic" / "model.safetensors").exists()  # HFExport's dirpath in sft.yaml
    checkpoint = next((run_dir / "checkpoints").glob("*.ckpt"))
    result = run_cli("validate", *common, "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/loss" in result.stdout
    result = run_cli("predict", *common, "--ckpt_path", str(checkpoint), "--trainer.callbacks", "[]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
