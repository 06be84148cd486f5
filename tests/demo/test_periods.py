"""The periods replay (what the rollout-policy comparison runs): an example's months through the
real server, its log sink and shadow process, the labels, the rollout check and a monthly retrain,
with a shadow policy, on the bikeshare sample (labels come back at once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flywheel.config import load_project
from flywheel.demo.periods import markdown, months, replay_periods
from flywheel.registry import CHAMPION, Registry
from flywheel.state import rollouts
from flywheel.state.db import open_state

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("examples")]


def test_months_cross_the_year():
    assert months(pd.Timestamp("2013-11-15").date(), 3)[1:] == [
        (pd.Timestamp("2013-12-01").date(), pd.Timestamp("2014-01-01").date()),
        (pd.Timestamp("2014-01-01").date(), pd.Timestamp("2014-02-01").date())]


def test_a_shadow_policy_replay_scores_the_challenger_on_the_next_month_and_decides(tmp_path):
    folder = tmp_path / "bikeshare"
    folder.mkdir()
    cfg = yaml.safe_load((REPO / "examples" / "bikeshare" / "flywheel.yaml").read_text())
    cfg["data"]["window"]["end"] = "2011-06-01"
    cfg["rollout"] = {"mode": "shadow"}
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / "bikeshare.parquet")
    said: list[str] = []
    out = replay_periods(project, frame, 2, say=said.append)

    june, july = out.periods
    assert (june.period, june.served_by, june.outcome) == ("2011-06", [1], "rollout started")
    assert june.rows == june.served == 720 and june.rollout is None  # nothing ran during June
    assert july.rollout is not None and july.rollout["challenger"] == june.retrained
    engine = open_state(project.state_url)
    first = rollouts.history(engine, project.config.registered_model, limit=10)[-1]
    assert first.evidence is not None
    scored, pairs = rollouts.shadow_count(engine, first.id), first.evidence["pairs"]
    if july.rollout["decision"] == "promote":  # within July, after a check: it served the rest
        assert july.served_by == [1, june.retrained] and 0 < pairs <= scored < july.served
        assert [(p.version, p.via) for p in out.promotions] == [(june.retrained, "rollout")]
        assert Registry.for_project(project).alias_version(CHAMPION) == june.retrained
    else:  # a shadow's challenger never answers; every July record scored and labelled
        assert july.served_by == [1] and pairs == scored == july.served and out.promotions == []
        assert Registry.for_project(project).alias_version(CHAMPION) == 1

    # retraining every month: July scored by the version June's end registered, as the loop would
    # have served it; the loop's own July metric is v1's
    assert july.every_period is not None and june.every_period is None
    summary = out.summary()
    assert summary["retrains"] == 2 and summary["rollouts"] == 2 and summary["policy"] == "shadow"
    assert summary["mean"] == pytest.approx((june.metric + july.metric) / 2)
    report = markdown([out])
    served_by = ", ".join(f"v{v}" for v in july.served_by)
    assert "| shadow | 2 |" in report and f"| 2011-07 | {served_by} |" in report
    assert any(line.startswith("2011-07:") for line in said)
    shutil.rmtree(folder)
