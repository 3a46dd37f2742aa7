"""A real install: `pip install -c constraints.txt .` into a fresh virtual environment (no
editable link, nothing of the test venv), then the installed `lbproxy` checks the quickstart
config and names its version; the hot modules run compiled (setup.py). Packages come from PyPI
(or pip's cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT + 60)
def test_pip_install_in_a_fresh_venv_then_check(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(ROOT / "constraints.txt"), str(ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]

    # The installed package, not the clone: imported from the new venv's site-packages.
    where = subprocess.run([str(py), "-c", "import lbproxy, acmeclient; print(lbproxy.__file__);"
                            " print(acmeclient.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(env_dir), line
    # setup.py compiled the hot modules (mypyc), and the installed tree runs them
    mode = subprocess.run([str(py), "-c", "import lbproxy.proxy as p; print(p.MODE)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert mode.stdout.strip() == "compiled", mode.stdout + mode.stderr

    exe = env_dir / "bin" / "lbproxy"
    config = tmp_path / "lbproxy.toml"
    config.write_text((ROOT / "conf" / "quickstart.toml").read_text())
    check = subprocess.run([str(exe), "check", "-c", str(config)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout

    version = subprocess.run([str(exe), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.split()[-1] == _project_version(), version.stdout


def _project_version() -> str:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_constraints_pin_every_runtime_dependency() -> None:
    """Every dependency pyproject names is pinned (==) in constraints.txt."""
    import re
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0]).lower()
        assert name in pins, f"{name} (from pyproject) is not pinned in constraints.txt"
    assert sys.version_info >= (3, 11)
