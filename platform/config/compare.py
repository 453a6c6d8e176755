"""Settings of `ctplatform compare`: two evaluated runs, tested against each other on the same cases."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


@dataclass
class CompareConfig:
    """Comparison"""

    run_a: str | None = option(None, "a run folder, report folder, bundle with a report, or results.json",
                               positional=True, path="read", metavar="RUN_A")
    run_b: str | None = option(None, "the run to compare it with (the same cases and labels)", positional=True,
                               path="read", metavar="RUN_B")
    labels: str | None = option(None, "labels CSV (default: the labels.csv each report folder keeps)", metavar="CSV",
                                  path="read")
    bootstrap_resamples: int = option(1000, "paired patient-bootstrap resamples for macro F1 and CRG")
    bootstrap_seed: int = option(0, "seed of the bootstrap resamples")
    alpha: float = option(0.05, "significance level of the two-sided tests")
    out: str | None = option(None, "write the comparison as JSON to this file", metavar="FILE.json", path="write")
