"""The Python API (`flywheel.api`): the README's runnable example end to end, and its errors."""

from __future__ import annotations

import re
import subprocess
import sys

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
    assert int(champion.group(1)) == api.status(project)["champion"]["version"]
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
