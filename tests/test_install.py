"""The wheel, installed as a user would: into a fresh venv of Python 3.11, 3.12 and 3.13, the
tabular loop (`[train]`, no other extra), then a real smoke test with that venv's `flywheel`. On
the newest Python the whole path: init on a CSV it has never seen, train, serve, one prediction
over HTTP, predict a file, SIGTERM. On the others (the whole suite runs on 3.11 from the source
tree): the import of every module, init and train, which together load every dependency the
loop needs. (The base alone, what the serving image installs, is tested by the image tests.)

Each Python's venv is kept in the download cache under a name that carries the hash of the
dependency bounds, so a later run only reinstalls the freshly built wheel (a changed bound makes
a new venv); the first run on a machine installs everything from the package index.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from flywheel.config import cache_dir
from flywheel.serving.process import free_port
from tests.conftest import REPO

VERSIONS = ["3.11", "3.12", "3.13"]
NOT_IN_CORE = ["torch", "transformers", "peft", "gguf", "prefect", "evidently"]


def python_for(version: str) -> Path:
    """This machine's interpreter for `version`: pyenv's, else one on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}"))
    if found:
        return found[-1]
    on_path = shutil.which(f"python{version}")
    if on_path:
        return Path(on_path)
    pytest.fail(f"no Python {version} here: the install test needs it (pyenv install {version})")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as `python -m build` does: an sdist from a copy of the sources (setuptools
    writes build/ and *.egg-info beside them, and each test worker builds its own), then the wheel
    from the sdist, so a file missing from the sdist fails here."""
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(out)], cwd=tree, check=True, timeout=300,
                   capture_output=True)
    [sdist] = out.glob("mlflywheel-*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(sdist), "-w", str(out)], check=True, timeout=300)
    [built] = out.glob("mlflywheel-*.whl")
    return built


def core_venv(version: str, wheel: Path) -> Path:
    """A venv of `version` with the wheel's tabular loop installed; made once per dependency set."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + meta["optional-dependencies"]["train"]
    key = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:12]
    venv = cache_dir() / f"install-py{version}-{key}"
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        args = ["--no-deps", "--force-reinstall"]
    else:
        shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
        subprocess.run([str(python_for(version)), "-m", "venv", str(venv)], check=True, timeout=120)
        args = []
    started = time.perf_counter()
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args, f"{wheel}[train]"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"python {version}: pip install {' '.join(args) or '(with dependencies)'} took "
          f"{time.perf_counter() - started:.0f}s")
    (venv / ".installed").touch()
    return venv


def tickets(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    waited = rng.gamma(2.0, 3.0, n).round(1)
    channel = rng.choice(["mail", "phone", "chat"], n)
    score = -1.5 + 0.15 * waited + 0.8 * (channel == "phone") + rng.normal(0, 1.0, n)
    opened = pd.Timestamp("2023-01-01") + pd.to_timedelta(np.sort(rng.integers(0, 700, n)), unit="D")
    return pd.DataFrame({"ticket": np.arange(n), "opened": opened.strftime("%Y-%m-%d"),
                         "waited_hours": waited, "channel": channel,
                         "escalated": np.where(score > 0, "yes", "no")})


def run(venv: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run([str(venv / "bin" / "flywheel"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, f"flywheel {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


FULL = VERSIONS[-1]


@pytest.mark.parametrize("version", VERSIONS)
def test_core_wheel_installs_and_serves_on(version, wheel, tmp_path):
    venv = core_venv(version, wheel)
    python = venv / "bin" / "python"
    found = subprocess.run([str(python), "-c", "import importlib.util as u, sys; print(sys.version_info[:2]);"
                            f"print([m for m in {NOT_IN_CORE!r} if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert found[0] == str(tuple(int(p) for p in version.split("."))) and found[1] == "[]", found
    assert f"flywheel 0.1.0 (Python {version}." in run(venv, "--version", cwd=tmp_path)

    tickets().to_csv(tmp_path / "tickets.csv", index=False)
    said = run(venv, "init", "--from", "tickets.csv", "--target", "escalated", cwd=tmp_path)
    assert "flywheel.yaml" in said and "opened" in said
    said = run(venv, "train", "--config", "flywheel.yaml", cwd=tmp_path)
    assert "Gate PASSED" in said and "champion → v1" in said, said
    if version != FULL:
        # Every module imports, or fails only for want of an extra's library.
        every_module = ("import importlib, pkgutil, flywheel\n"
                        "for m in pkgutil.walk_packages(flywheel.__path__, 'flywheel.'):\n"
                        "    if '.migrations' in m.name: continue\n"
                        "    try: importlib.import_module(m.name)\n"
                        "    except ModuleNotFoundError as e:\n"
                        f"        assert e.name in {NOT_IN_CORE!r}, (m.name, e)\n")
        subprocess.run([str(python), "-c", every_module], check=True, timeout=300)
        return

    port = free_port()
    serve = ["serve", "--config", "flywheel.yaml", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"]
    server = subprocess.Popen([str(venv / "bin" / "flywheel"), *serve], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        answer = httpx.post(f"{url}/v1/predict", json={"waited_hours": 12.5, "channel": "phone"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 1 and 0 <= answer.json()["predictions"][0]["probability"] <= 1
    finally:
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 is a clean stop
    assert server.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert '"level":"info"' not in log and "worker_started" not in log, log[-2000:]  # --log-level

    run(venv, "predict", "--config", "flywheel.yaml", "--input", "tickets.csv", "--output", "scored.csv",
        "--keep", "escalated", cwd=tmp_path)
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert len(scored) == 3000 and scored["probability"].between(0, 1).all()
    assert list(scored["escalated"]) == list(tickets()["escalated"])
