"""The command line: ``python -m ltpost fit|validate|test|predict --config configs/X.yaml``.

LightningCLI in subclass mode for both model and data, so a YAML names any ``LightningModule`` /
``LightningDataModule`` by ``class_path`` (ltpost's, or a subclass in the user's research code) and every
``__init__`` argument is a typed, documented option. Unknown keys and flags are rejected by jsonargparse with
the offending name.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import ltpost  # noqa: F401  (registers ltpost's classes so YAML may use short class names)


class LtpostCLI(LightningCLI):
    """LightningCLI with ltpost's defaults: subclass mode, a config saved beside the logs, no auto optimizer."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # argparse accepts any unique prefix of a flag by default, so `--trainer.max_step` silently meant
        # `--trainer.max_steps`; a typo must be an error instead, in the main parser and every subcommand's.
        strict = {"allow_abbrev": False}
        parser_kwargs = {**strict, **{name: dict(strict) for name in self.subcommands()}}
        parser_kwargs.update(kwargs.pop("parser_kwargs", {}))
        kwargs["parser_kwargs"] = parser_kwargs
        kwargs.setdefault("auto_configure_optimizers", False)  # modules own their optimizer and schedule
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )


def main(args=None) -> LtpostCLI:
    return LtpostCLI(args=args)
