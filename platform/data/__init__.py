"""CT-RATE data layer: readers, synthetic data, slice cache and datasets. Runs without Ray."""
