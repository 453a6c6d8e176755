"""Hyper-parameter sweeps: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials."""
