"""Evaluation: the official VLM3D Task 2 scoring, calibration fitting, slice -> volume aggregation, the predictor,
the challenge's files (results.json) and the report; :mod:`ctplatform.evaluation.evaluate` is the entry point.

Imports data and model only (never train, tune, serve, Ray or Lightning), so a served model and the `score`
command run without training code.
"""
