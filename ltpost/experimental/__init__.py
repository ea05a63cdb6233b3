"""Methods without a stability promise: same shape as the stable ones (a LightningModule + a LightningDataModule)."""
