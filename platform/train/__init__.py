"""Training: the LightningModule and DataModule (no Ray inside) and the Ray Train launcher."""
