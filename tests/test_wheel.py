"""Install anywhere: the wheel carries the bundled configs, and the default runs from it in a
folder that is not the repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists its packages (the configs package is mapped, not found), so a new
    subpackage must be added there: this fails until it is."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "unlearn_cli").rglob("__init__.py")}
    assert found | {"unlearn_cli.configs"} == listed


def _run(cmd, *, cwd, env, timeout):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_the_wheel_runs_the_default_from_another_folder(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("unlearn_cli", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip"]
    # Offline and bounded: no index, no build isolation (the venv's setuptools builds it).
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          tmp_path / "dist", src], cwd=tmp_path, env=env, timeout=300)
    wheel = next((tmp_path / "dist").glob("unlearn_cli-*.whl"))
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", site, wheel],
         cwd=tmp_path, env=env, timeout=300)
    for path in (REPO / "configs").glob("*.yaml"):
        assert (site / "unlearn_cli" / "configs" / path.name).read_bytes() == path.read_bytes()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(site)  # the installed copy, not the repository
    where = _run([sys.executable, "-c", "import unlearn_cli.config as c; print(c.CONFIG_DIR)"],
                 cwd=elsewhere, env=env, timeout=120)
    assert Path(where.strip()) == site / "unlearn_cli" / "configs"
    unlearn = site / "bin" / "unlearn"
    shown = _run([unlearn, "configs", "show", "digits"], cwd=elsewhere, env=env, timeout=120)
    assert shown == (REPO / "configs" / "digits.yaml").read_text()
    assert "digits" in _run([unlearn, "configs"], cwd=elsewhere, env=env, timeout=120)
    _run([unlearn, "train-refs", "--num-models", 1, "--workers", 1, "--device", "cpu",
          "--set", "train.epochs=1"], cwd=elsewhere, env=env, timeout=300)
    assert (elsewhere / "runs" / "digits" / "reference" / "seed-000000" / "outputs.npz").is_file()


def test_configs_lists_and_shows_the_bundled_configs():
    from typer.testing import CliRunner

    from unlearn_cli.cli import app
    from unlearn_cli.config import load_config

    runner = CliRunner()
    listed = runner.invoke(app, ["configs"])
    assert listed.exit_code == 0
    for path in (REPO / "configs").glob("*.yaml"):
        assert path.stem in listed.output
        shown = runner.invoke(app, ["configs", "show", path.stem])
        assert shown.exit_code == 0 and shown.output == path.read_text()
    bad = runner.invoke(app, ["configs", "show", "nope"])
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert bad.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: no bundled config 'nope'; bundled: cifar10-fast")
    # --config takes a bundled name, with or without .yaml.
    assert load_config("cifar10-fast").name == load_config("cifar10-fast.yaml").name == \
        "cifar10-fast"
