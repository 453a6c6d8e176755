"""The package installs as `ctplatform` and never shadows the standard library's `platform`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_platform_from_repo_root_is_stdlib():
    code = "import platform, sys; assert hasattr(platform, 'python_version'); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" not in out.stdout and not out.stdout.startswith(str(ROOT / "platform"))
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_ctplatform_imports_from_anywhere(tmp_path):
    code = "import ctplatform.labels as l; print(len(l.CLASS_NAMES))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "18"


def test_console_script_help():
    exe = Path(sys.executable).with_name("ctplatform")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "prepare" in out.stdout and "demo-data" in out.stdout


def test_every_subpackage_is_in_the_installed_package_list():
    """pyproject.toml names its packages (platform/ is mapped to ctplatform): a subpackage missing there would be
    absent from a wheel although the editable install finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"ctplatform"} | {"ctplatform." + ".".join(p.parent.relative_to(ROOT / "platform").parts)
                              for p in (ROOT / "platform").rglob("__init__.py")}
    assert listed == found
