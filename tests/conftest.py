"""Shared fixtures: the committed SBA sample, projects in temporary folders, a PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from flywheel.config import Project, load_project  # noqa: E402
from flywheel.data.sources import write_table  # noqa: E402
from flywheel.demo.sba import SOURCE_TYPES  # noqa: E402
from flywheel.serving import process as serving_process  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sba-loans" / "flywheel.yaml"
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

MakeProject = Callable[..., Project]


@pytest.fixture(scope="session")
def sba_sample() -> pd.DataFrame:
    """About 36k cleaned SBA loans, FY1990-2012, stratified by year and outcome."""
    frame = pd.read_parquet(SAMPLE)
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        frame[col] = pd.to_datetime(frame[col]).dt.date
    return frame


def example_config() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_project(tmp_path: Path) -> MakeProject:
    """Write a flywheel.yaml (the SBA example plus `patch`) into a fresh folder and load it."""

    def make(patch: dict[str, Any] | None = None, name: str = "proj") -> Project:
        return new_project(tmp_path / name, patch)

    return make


def new_project(folder: Path, patch: dict[str, Any] | None = None) -> Project:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(_merge(example_config(), patch or {}), sort_keys=False))
    return load_project(path, env={"FLYWHEEL_HOME": str(folder / ".flywheel")})


def load_sample(project: Project, sample: pd.DataFrame) -> Project:
    write_table(sample, project.source_url, project.config.data.table, SOURCE_TYPES,
                index_columns=("approval_date",))
    return project


@pytest.fixture
def loaded_project(make_project: MakeProject, sba_sample: pd.DataFrame) -> MakeProject:
    """A project whose source database already holds the SBA sample."""

    def make(patch: dict[str, Any] | None = None, name: str = "proj") -> Project:
        return load_sample(make_project(patch, name), sba_sample)

    return make


def repoint_mlflow(mlflow_db: Path, old: str, new: str) -> None:
    """MLflow records absolute artifact paths: rewrite `old` to `new` in every text column."""
    with sqlite3.connect(mlflow_db) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = '
                               f'REPLACE("{column[1]}", ?, ?)', (old, str(new)))


def clone_project(project: Project, folder: Path, env: dict[str, str] | None = None) -> Project:
    """A copy of an embedded-default project (SQLite stores, file artifacts) in `folder`: tests that
    each need a trained project start from one made once, not from a training of their own."""
    shutil.copytree(project.path.parent, folder)
    home = folder / project.home.relative_to(project.path.parent)
    repoint_mlflow(home / "mlflow.db", str(project.home), str(home))
    return load_project(folder / project.path.name, env={"FLYWHEEL_HOME": str(home), **(env or {})})


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    import sqlalchemy as sa

    name = f"flywheel_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory: pytest.TempPathFactory, sba_sample: pd.DataFrame) -> Any:
    """The example project's training window on the sample: features built, split by time."""
    from flywheel.lifecycle.features import extract_training_window, prepare_features

    folder = tmp_path_factory.mktemp("prepared")
    path = folder / "flywheel.yaml"
    path.write_text(EXAMPLE.read_text())
    project = load_project(path, env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    return prepare_features(project, extract_training_window(project))


free_port = serving_process.free_port


class ServerProcess(serving_process.ServerProcess):
    """`flywheel serve` in a subprocess on 127.0.0.1, ready when /ready answers 200."""

    def __init__(self, project: Project, env: dict[str, str] | None = None, workers: int = 1,
                 wait_ready: bool = True):
        super().__init__(project, workers=workers, env=env)
        if wait_ready:
            self.wait_ready(90)


# The longest tests start first: with two workers, a four-minute test that is handed out last
# keeps one worker busy after the other has finished everything else.
LONGEST_FIRST = (
    "tests/demo/test_demo_full.py",
    "tests/llm/test_finetune_smollm2.py",
    "tests/pipeline/test_airflow_dag.py",
    "tests/lifecycle/test_aliases.py",
    "tests/test_walkthrough.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@contextlib.contextmanager
def mlflow_server(folder: Path, backend: str | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """`mlflow server` on `host` with proxied artifact storage under `folder` (the backend a
    SQLite file there unless given); its URL, until the block ends."""
    import subprocess
    import sys
    import time

    import httpx

    port = serving_process.free_port()
    backend = backend or f"sqlite:///{folder / 'mlflow-server.db'}"
    if backend.startswith("postgresql://"):
        backend = "postgresql+psycopg://" + backend.removeprefix("postgresql://")
    log_path = folder / "mlflow-server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(folder / "server-artifacts"), "--serve-artifacts",
             "--host", host, "--port", str(port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)
