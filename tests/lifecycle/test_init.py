"""`flywheel init` on a file it has never seen: the config it writes trains as it is."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.lifecycle.init import InitError, propose_project

runner = CliRunner()


def tickets(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    opened = pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 900, n), "D")
    priority = rng.choice(["low", "normal", "high", "urgent"], n)
    words = rng.integers(5, 400, n)
    escalated = (rng.normal(0, 1, n) + 0.004 * words + 0.8 * (priority == "urgent") > 1.3)
    return pd.DataFrame({
        "Ticket ID": [f"T-{i:05d}" for i in range(n)],
        "opened_on": opened.strftime("%Y-%m-%d"),
        "priority": priority, "words": words, "customer_tier": rng.choice(["a", "b", "c"], n),
        "region": "emea",                                   # constant: not a feature
        "notes": [f"free text {i}" for i in range(n)],      # unique text: not a feature
        # recorded after the outcome: the team that finally handled it
        "resolver_team": np.where(escalated, "tier-2", rng.choice(["tier-1", "bot"], n)),
        "escalated": np.where(escalated, "yes", "no"),
    })


def invoke(*args: str, home):
    done = runner.invoke(app, list(args), env={"FLYWHEEL_HOME": str(home), "COLUMNS": "300"})
    return done.exit_code, " ".join(done.output.split())


def test_init_profiles_screens_and_writes_a_config_that_trains_as_it_is(tmp_path):
    data = tmp_path / "support-tickets.csv"
    tickets().to_csv(data, index=False)
    config, home = tmp_path / "proj" / "flywheel.yaml", tmp_path / "proj" / ".flywheel"
    code, said = invoke("init", "--from", str(data), "--target", "escalated", "--output", str(config),
                        home=home)
    assert code == 0, said
    # the table may wrap its cells at the terminal's width: check words that fit in one cell line
    assert "loaded 3,000 rows into support_tickets" in said and "likely leak" in said
    written = yaml.safe_load(config.read_text())
    d = written["data"]
    assert (d["id_column"], d["time_column"], d["time_unit"]) == ("Ticket ID", "opened_on", "text")
    assert d["target"] == {"kind": "column", "column": "escalated", "positive": "yes"}
    assert {f["column"] for f in written["features"]} == {"priority", "words", "customer_tier"}
    text = config.read_text()
    assert "left out: resolver_team alone reaches ROC-AUC" in text
    assert "not a feature: region (constant)" in text and "not a feature: notes (3,000 distinct" in text

    code, said = invoke("train", "--config", str(config), home=home)
    assert code == 0, said
    assert "3,000 labelled rows" in said and "Gate PASSED" in said

    again = invoke("init", "--from", str(data), "--target", "escalated", "--output", str(config), home=home)
    assert again[0] == 1 and "exists" in again[1] and "--force" in again[1]


def test_data_without_a_time_or_a_two_valued_target_is_refused_with_what_to_add():
    frame = tickets(500).drop(columns="opened_on")
    try:
        propose_project(frame, "escalated")
    except ValueError as err:
        assert "no column says when each row happened" in str(err) and "--time" in str(err)
    else:
        raise AssertionError("no time column was accepted")
    try:
        propose_project(tickets(500), "priority", task="binary")
    except ValueError as err:
        assert "'priority' has 4 distinct values" in str(err)
    else:
        raise AssertionError("a four-valued target was accepted as binary")


def test_a_number_becomes_a_regression_and_a_few_values_a_multiclass_target(tmp_path):
    from pathlib import Path

    from flywheel.config import load_project
    from flywheel.lifecycle.init import render_config

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    flights = pd.read_parquet(fixtures / "flights_sample.parquet")
    p = propose_project(flights, "arr_delay", time="scheduled")
    assert p.task == "regression" and p.positive is None
    assert list(p.leaky) == ["dep_delay"] and p.leaky["dep_delay"] >= 0.75  # measured after the arrival
    assert p.target_std == pytest.approx(flights["arr_delay"].std())
    hours = pd.read_parquet(fixtures / "bikeshare.parquet")
    m = propose_project(hours, "weathersit", time="time", id_column="hour_id")
    assert m.task == "multiclass" and m.classes == ["clear", "cloudy/misty", "rain/snow"]
    assert sum(m.class_shares) == pytest.approx(1)
    for name, proposal, metric in (("f", p, "rmse"), ("m", m, "log_loss")):
        path = tmp_path / name / "flywheel.yaml"
        path.parent.mkdir()
        path.write_text(render_config(proposal))
        cfg = load_project(path).config
        assert cfg.task == proposal.task and cfg.gate.metric == metric
    assert load_project(tmp_path / "m" / "flywheel.yaml").config.data.target.classes == m.classes
    assert propose_project(hours, "weathersit", time="time", id_column="hour_id",
                           task="multiclass").task == "multiclass"
    with pytest.raises(InitError, match="2 classes: a multiclass target needs three"):
        propose_project(tickets(300), "escalated", task="multiclass")


def test_a_year_column_is_found_by_its_name_and_values():
    frame = tickets(800).drop(columns="opened_on").assign(
        fiscal_year=np.random.default_rng(1).integers(2015, 2023, 800))
    p = propose_project(frame, "escalated")
    assert (p.time_column, p.time_unit, p.window) == ("fiscal_year", "year", ("2015", "2023"))


def test_text_dates_in_another_shape_than_iso_get_their_format_and_train(tmp_path):
    frame = tickets()
    opened = pd.to_datetime(frame["opened_on"])
    data = tmp_path / "eu.csv"
    frame.assign(opened_on=opened.dt.strftime("%d/%m/%Y")).to_csv(data, index=False)
    config, home = tmp_path / "eu" / "flywheel.yaml", tmp_path / "eu" / ".flywheel"
    code, said = invoke("init", "--from", str(data), "--target", "escalated", "--output", str(config),
                        home=home)
    assert code == 0, said
    d = yaml.safe_load(config.read_text())["data"]
    assert (d["time_unit"], d["time_format"]) == ("text", "%d/%m/%Y")
    assert d["window"] == {"start": opened.min().date(), "end": (opened.max() + pd.Timedelta(days=1)).date()}
    code, said = invoke("train", "--config", str(config), home=home)
    assert code == 0 and "3,000 labelled rows" in said, said

    # only days up to 12: day-first and month-first both read them; the config says to check
    days = [f"{d:02d}/{m:02d}/2022" for d, m in zip(range(1, 13), [1, 2, 3] * 4, strict=True)]
    early = frame.head(50).assign(opened_on=days * 4 + ["01/01/2022"] * 2)
    p = propose_project(early, "escalated", time="opened_on")
    assert p.time_format == "%d/%m/%Y" and "%m/%d/%Y also reads every value: check" in p.time_why
    mixed = frame.head(50).assign(opened_on=["2022-01-05"] * 25 + ["05.01.2022"] * 25)
    with pytest.raises(InitError, match="no single date format reads every value .*2022-01-05, 05.01.2022"):
        propose_project(mixed, "escalated", time="opened_on")


def test_a_hostile_header_stays_inside_its_comment_and_the_config_reads_back(tmp_path):
    """A CSV header with a newline once wrote `serving: {host: 0.0.0.0}` into the config."""
    from flywheel.config import load_project
    from flywheel.lifecycle.init import render_config

    evil = "region\nserving: {host: 0.0.0.0}\n#"
    frame = tickets(800).rename(columns={"region": evil})  # constant: "not a feature" comment
    frame["odd\u2028name"] = "same"
    p = propose_project(frame, "escalated")
    path = tmp_path / "flywheel.yaml"
    path.write_text(render_config(p))
    written = yaml.safe_load(path.read_text())
    assert "serving" not in written
    assert "not a feature: region\\u000aserving: {host: 0.0.0.0}\\u000a#" in path.read_text()
    load_project(path, env={"FLYWHEEL_HOME": str(tmp_path / ".flywheel")})  # and it loads as written


def test_a_key_given_twice_in_the_config_is_refused_with_both_lines(tmp_path):
    from flywheel.config import ConfigError, load_project
    from tests.conftest import EXAMPLE

    path = tmp_path / "flywheel.yaml"
    path.write_text(EXAMPLE.read_text() + "\nserving:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError, match="'serving' is given twice"):
        load_project(path, env={"FLYWHEEL_HOME": str(tmp_path / ".flywheel")})


def test_three_years_get_split_fractions_that_train_accepts(tmp_path):
    """A window of three distinct years (the only time column an integer year): the default
    fractions put two years in one part, so init writes fractions that cut at the years."""
    frame = tickets(1000).drop(columns="opened_on")
    frame["year"] = np.repeat([2016, 2017, 2018], [200, 300, 500])
    data = tmp_path / "three-years.csv"
    frame.to_csv(data, index=False)
    config, home = tmp_path / "proj" / "flywheel.yaml", tmp_path / "proj" / ".flywheel"
    code, said = invoke("init", "--from", str(data), "--target", "escalated", "--time", "year",
                        "--output", str(config), home=home)
    assert code == 0, said
    split = yaml.safe_load(config.read_text())["split"]
    assert "train/validation/holdout 200/300/500 rows" in config.read_text()
    assert 0 < split["validation_fraction"] < 0.5 and 0 < split["holdout_fraction"] < 0.5
    code, said = invoke("train", "--config", str(config), home=home)
    assert code == 0, said


def test_a_split_that_cannot_work_names_the_fractions_that_would():
    from flywheel.config import SplitConfig
    from flywheel.training.split import SplitError, split_by_time

    times = pd.Series(pd.to_datetime(["2016-01-01"] * 200 + ["2017-01-01"] * 300 + ["2018-01-01"] * 500))
    with pytest.raises(SplitError, match=r"set split.validation_fraction: 0\.\d+ and "
                                         r"split.holdout_fraction: 0\.\d+ \(train/validation/holdout "
                                         r"200/300/500 rows\)"):
        split_by_time(times, SplitConfig())
