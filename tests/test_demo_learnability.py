"""The demo's recipe learns the easy preset from its labels (benchmarks/demo_learnability.py, BENCHMARKS.md "The
demo's easy preset"): trained in-process the way a demo trial trains (the demo's backbone from random weights, BCE,
the demo's slices per volume), with a control whose training label rows are shuffled between patients."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def learnability():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("demo_learnability", BENCHMARKS / "demo_learnability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_recipe_learns_from_the_labels_and_not_from_shuffled_ones():
    """A third of the demo's volumes and 4 epochs (about a minute on 2 cores): the true labels are learned well
    above chance, the shuffled ones are not (about 60 validation volumes: chance wanders +-0.1 around 0.5). The
    validation labels are the true ones in both runs."""
    from ctplatform.demo import DEMO_SIZE

    rows = learnability().run([0], volumes=400, size=DEMO_SIZE, epochs=4, realistic=False)
    true, shuffled = (next(r for r in rows if r["labels"] == kind) for kind in ("true", "shuffled"))
    print({"true": true["curve"], "shuffled": shuffled["curve"]})
    assert true["best_auroc"] >= 0.70, rows
    assert shuffled["best_auroc"] <= 0.6 and true["best_auroc"] - shuffled["best_auroc"] >= 0.15, rows


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
def test_the_demo_recipe_reaches_085_on_three_seeds_and_shuffled_labels_stay_near_chance():
    """At the demo's size (its volumes, slices and epochs), as `make demo` trains: best validation macro AUROC
    >= 0.85 on each of 3 data seeds, the shuffled-label control within 0.1 of chance. About 15 minutes on 2 cores:
    `pytest -m benchmark`."""
    from ctplatform.demo import run_demo

    defaults = run_demo.__kwdefaults__
    rows = learnability().run([0, 1, 2], volumes=defaults["volumes"], size=defaults["size"],
                              epochs=defaults["epochs"], realistic=False)
    assert all(r["best_auroc"] >= 0.85 for r in rows if r["labels"] == "true"), rows
    assert all(abs(r["best_auroc"] - 0.5) <= 0.1 for r in rows if r["labels"] == "shuffled"), rows
