"""`ctplatform demo` as a newcomer runs it, small: a real embedded Ray, sweep, bundle and Serve, in a
non-interactive log. The log is short and clean, and every path its summary prints exists."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_log_is_short_clean_and_its_paths_exist(tmp_path):
    work = tmp_path / "demo"
    exe = Path(sys.executable).with_name("ctplatform")
    out = subprocess.run([str(exe), "demo", "--workdir", str(work), "--volumes", "24", "--trials", "1", "--epochs",
                          "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    log = out.stdout
    assert out.returncode == 0, log[-3000:]
    lines = log.splitlines()
    assert len(lines) <= 60, log
    for noise in ("warning", "traceback", "/tmp/ray"):  # Python/Ray/Optuna warnings, tracebacks, Tune's hints
        assert noise not in log.lower(), log

    def field(label):
        found = [line.split(label, 1)[1].strip() for line in lines if line.strip().startswith(label)]
        assert len(found) == 1, (label, log)
        return found[0]

    report = Path(field("report"))
    assert report.name == "report.html" and report.is_file()
    tensorboard = Path(field("TensorBoard").removeprefix("tensorboard --logdir "))
    assert tensorboard.is_relative_to(work) and list(tensorboard.rglob("events.out.tfevents.*"))
    study = Path(field("Optuna study").removeprefix("optuna-dashboard sqlite:///"))
    assert study.is_file() and study.is_relative_to(work)
    bundle = Path(field("bundle"))
    assert (bundle / "metadata.json").is_file()
    assert field("serve it").startswith(f"ctplatform serve --bundle {bundle}")
    assert Path(field("trials table")).is_file()
    assert re.search(r"validation macro AUROC \d\.\d{3}", log)
    # the served prediction: HTTP 200 and three class names with probabilities
    served = field("served answer")
    assert "(HTTP 200" in served and len(re.findall(r" \d\.\d\d", served.split("):", 1)[1])) == 3
