"""The Python API (`flywheel.api`): the documented runnable example end to end, its errors, and
that it is the one surface: a function for every command, typed results, a cheap import."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pandas as pd
import pytest

from flywheel import api
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "churn"


def test_the_churn_example_trains_scores_appends_and_retrains(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE / "api_example.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    said = done.stdout
    assert re.search(r"loaded 6,\d{3} customers", said), said
    first = re.search(r"v1: holdout ROC-AUC (0\.\d+), gate passed, promoted True", said)
    assert first and float(first.group(1)) > 0.7, said
    scored = re.search(r"scored 1,\d{3} customers of 2023 with v1: ROC-AUC (0\.\d+)", said)
    assert scored and float(scored.group(1)) > 0.7, said
    assert re.search(r"retrain 2024-01-01-\w+: succeeded, v2 (promoted|not promoted)", said), said
    champion = re.search(r"champion v(\d): trained on ([\d,]+) rows (\S+)\.\.(\S+) \((\w+)\)", said)
    assert champion, said
    project = api.load(EXAMPLE / "flywheel.yaml", env={"FLYWHEEL_HOME": str(tmp_path / ".flywheel")})
    assert int(champion.group(1)) == api.status(project).champion.version
    if champion.group(1) == "2":  # the retrain's window: three years before its clock, both sides
        assert champion.group(3, 4, 5) == ("2021-01-01", "2024-01-01", "both")

    rows = pd.read_csv(tmp_path / "recent.csv").head(20)
    scored_frame = api.predict(project, rows, version=1, keep=("churned",))
    assert list(scored_frame.columns) == ["customer_id", "signup_date", "churned", "probability",
                                          "decision", "model_version"]
    assert (scored_frame["model_version"] == 1).all() and scored_frame["probability"].between(0, 1).all()
    with pytest.raises(api.FlywheelError, match="missing input column.*age"):
        api.predict(project, rows.drop(columns=["age"]))
    with pytest.raises(api.FlywheelError, match="no column.*refund"):
        api.predict(project, rows, keep=("refund",))


# command (as typed after `flywheel`) -> the API function that does its work
COMMANDS = {"demo": "demo", "example": "example", "replay": "replay", "monitor": "monitor",
            "retrain": "retrain", "step": "step", "run": "run", "init": "init", "ingest": "ingest",
            "train": "train", "import": "import_model", "evaluate": "evaluate", "promote": "promote",
            "rollback": "rollback", "abort-rollout": "abort_rollout",
            "status": "status", "card": "card", "serve": "serve", "room": "room",
            "predict": "predict_file", "log export": "log_export", "log prune": "log_prune",
            "log compact": "log_compact",
            "image build": "build_image", "finetune": "finetune", "export": "export", "publish": "publish"}


def cli_commands() -> set[str]:
    import typer.main

    from flywheel.cli import app

    def walk(group: Any, prefix: str) -> set[str]:
        found: set[str] = set()
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group: `flywheel log ...`
                found |= walk(cmd, f"{prefix}{name} ")
            else:
                found.add(prefix + name)
        return found

    return walk(typer.main.get_command(app), "")


def test_every_command_has_its_function_in_the_api():
    assert cli_commands() == set(COMMANDS)
    assert all(callable(getattr(api, fn)) and fn in api.__all__ for fn in COMMANDS.values())


def test_the_api_returns_typed_results_and_is_documented():
    import inspect

    for name in api.__all__:
        fn = getattr(api, name)
        if not inspect.isfunction(fn):
            continue
        returns = str(fn.__annotations__.get("return"))
        assert not re.search(r"\bAny\b|\bdict\b", returns), f"api.{name} returns {returns}"
        assert fn.__doc__ and len(fn.__doc__) > 30, f"api.{name} has no docstring"


def test_importing_the_api_and_the_cli_loads_no_pandas_or_mlflow():
    code = ("import sys, flywheel.cli, flywheel.api; "
            "print(sorted(m for m in ('pandas', 'mlflow', 'torch', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_api_refuses_what_the_command_refuses(tmp_path):
    project = api.load(EXAMPLE / "flywheel.yaml", env={"FLYWHEEL_HOME": str(tmp_path / ".flywheel")})
    with pytest.raises(api.InvalidArgument, match="--log-level must be one of"):
        api.serve(project, log_level="loud")
    with pytest.raises(api.InvalidArgument, match="no example 'nope'"):
        api.example("nope")
    with pytest.raises(api.InvalidArgument, match="no retention"):
        api.log_prune(project)
    with pytest.raises(api.FlywheelError, match="exists: choose another --output"):
        api.init("customers.csv", "churned", EXAMPLE / "flywheel.yaml")
