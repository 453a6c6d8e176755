"""Training: the LightningModule and DataModule (no Ray inside), evaluation, and the Ray Train launcher."""
