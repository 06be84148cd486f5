"""A project on data that is not the demo's: an integer year as time, loaded with `flywheel ingest`,
grown with `--append`, and every way a window can come out empty refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import load_project
from flywheel.data.sources import make_engine
from flywheel.lifecycle.status import project_status

runner = CliRunner()


def customers(n: int, first_id: int = 0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, n)
    spend = rng.gamma(2.0, 30.0, n).round(2)
    plan = rng.choice(["basic", "plus", "pro"], n)
    score = -1.0 + 0.02 * (50 - age) + 0.01 * spend - 0.5 * (plan == "pro") + rng.normal(0, 1.5, n)
    return pd.DataFrame({"customer_id": np.arange(first_id, first_id + n),
                         "signup_year": rng.integers(2012, 2020, n), "age": age, "monthly_spend": spend,
                         "plan": plan, "churned": (score > 0.5).astype(int)})


def config(folder: Path, **data: object) -> Path:
    cfg = {"project": "churn",
           "data": {"table": "customers", "id_column": "customer_id", "time_column": "signup_year",
                    "time_unit": "year", "window": {"start": 2012, "end": 2020},
                    "target": {"kind": "column", "column": "churned", "positive": 1}, **data},
           "features": [{"name": "age", "kind": "numeric", "column": "age"},
                        {"name": "spend", "kind": "numeric", "column": "monthly_spend"},
                        {"name": "plan", "kind": "category", "column": "plan"}],
           "gate": {"floor": 0.55}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(*args: str, home: Path) -> tuple[int, str]:
    done = runner.invoke(app, list(args), env={"FLYWHEEL_HOME": str(home), "COLUMNS": "200"})
    return done.exit_code, " ".join(done.output.split())


def test_integer_years_ingest_train_and_append(tmp_path):
    path, home = config(tmp_path / "churn"), tmp_path / "churn" / ".flywheel"
    first = tmp_path / "first.csv"
    customers(4000).to_csv(first, index=False)
    code, said = cli("ingest", "--config", str(path), "--input", str(first), home=home)
    assert code == 0, said
    assert "loaded 4,000 rows into customers (signup_year 2012-01-01 00:00:00 .. 2019-01-01" in said
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 0, said
    assert "Snapshot" in said and "4,000 labelled rows from 2012-01-01 to 2020-01-01" in said
    assert "Gate PASSED" in said
    champion = project_status(load_project(path, env={"FLYWHEEL_HOME": str(home)})).champion
    assert champion.trained_on.rows == 4000

    more = customers(500, first_id=3800, seed=1)  # 200 ids already there, 300 new ones
    more_file = tmp_path / "more.parquet"
    more.to_parquet(more_file)
    code, said = cli("ingest", "--config", str(path), "--input", str(more_file), "--append", home=home)
    assert code == 0, said
    assert "added 300 and replaced 200 rows of customers" in said
    engine = make_engine(f"sqlite:///{home / 'source.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM customers")).scalar() == 4300
        stored = conn.execute(sa.text("SELECT signup_year, age FROM customers "
                                      "WHERE customer_id = 3900")).one()
    engine.dispose()
    row = more.loc[more.customer_id == 3900].iloc[0]
    assert tuple(stored) == (row.signup_year, row.age)  # the year stays a year in the source
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 0 and "4,300 labelled rows" in said, said


def test_every_empty_window_is_refused_with_what_the_table_holds(tmp_path):
    file = tmp_path / "rows.csv"
    customers(2000).to_csv(file, index=False)

    path, home = config(tmp_path / "later", window={"start": 2030, "end": 2035}), tmp_path / "later" / "h"
    assert cli("ingest", "--config", str(path), "--input", str(file), home=home)[0] == 0
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 1 and "Traceback" not in said
    assert ("0 rows of 'customers' have signup_year in [2030-01-01, 2035-01-01); the table's 2,000 rows "
            "span 2012 .. 2019 (time_unit year): set data.window inside that span") in said

    unread = config(tmp_path / "dates", time_unit="date", window={"start": "2012-01-01", "end": "2020-01-01"})
    code, said = cli("ingest", "--config", str(unread), "--input", str(file), home=tmp_path / "dates" / "h")
    assert code == 1 and "holds numbers" in said and "set data.time_unit to year" in said

    one_year = tmp_path / "one-year.csv"
    customers(2000).assign(signup_year=2015).to_csv(one_year, index=False)
    path, home = config(tmp_path / "ties"), tmp_path / "ties" / "h"
    assert cli("ingest", "--config", str(path), "--input", str(one_year), home=home)[0] == 0
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 1 and "fall on 1 distinct time(s)" in said and "never split at random" in said


def test_text_dates_in_a_format_of_their_own(tmp_path):
    rows = customers(3000)
    days = pd.to_datetime(rows.signup_year.astype(str) + "-01-01") + \
        pd.to_timedelta(rows.customer_id % 360, "D")
    rows["signup_date"] = days.dt.strftime("%d/%m/%Y")
    file = tmp_path / "rows.csv"
    rows.drop(columns="signup_year").to_csv(file, index=False)
    path = config(tmp_path / "text", time_column="signup_date", time_unit="text", time_format="%d/%m/%Y",
                  window={"start": "2014-01-01", "end": "2020-01-01"})
    home = tmp_path / "text" / "h"
    assert cli("ingest", "--config", str(path), "--input", str(file), home=home)[0] == 0
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 0, said
    expected = int((days >= "2014-01-01").sum())
    assert f"{expected:,} labelled rows from 2014-01-01 to 2020-01-01" in said


@pytest.mark.parametrize("bad", ["customers.xlsx", "missing.csv"])
def test_ingest_refuses_files_it_cannot_read(tmp_path, bad):
    path = config(tmp_path / "p")
    if bad.endswith(".xlsx"):
        (tmp_path / bad).write_bytes(b"PK")
    code, said = cli("ingest", "--config", str(path), "--input", str(tmp_path / bad), home=tmp_path / "h")
    assert code == 1 and ("give a .parquet or .csv file" in said or "no such file" in said)


def test_a_retrain_with_no_rows_in_its_window_fails_with_the_reason_and_no_traceback(tmp_path):
    path, home = config(tmp_path / "p"), tmp_path / "p" / "h"
    file = tmp_path / "rows.csv"
    customers(2000).to_csv(file, index=False)
    assert cli("ingest", "--config", str(path), "--input", str(file), home=home)[0] == 0
    code, said = cli("retrain", "--config", str(path), "--orchestrator", "local", "--at", "2011-06-01",
                     home=home)
    assert code == 1 and "Traceback" not in said
    assert "failed" in said and "0 rows of 'customers' have signup_year in [2005-06-01, 2011-06-01)" in said
    assert "retraining.lookback_months" in said
