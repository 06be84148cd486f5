"""A window of the prediction log exported to Parquet, as served and labelled over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from flywheel.core.errors import FlywheelError
from flywheel.lifecycle.prediction_log import export_log, prune_log
from flywheel.lifecycle.train import train_challenger
from flywheel.serving.process import ServerProcess
from tests.pipeline.test_loop import WEAK, send_traffic


@pytest.mark.parametrize("state", ["sqlite", "postgresql"])
def test_a_window_of_the_log_goes_to_parquet_with_its_labels(state, loaded_project, tmp_path, request):
    stores = {"state": request.getfixturevalue("postgres_url")} if state == "postgresql" else {}
    project = loaded_project({**WEAK, "stores": stores})
    assert train_challenger(project).promoted
    with ServerProcess(project) as server:
        server.wait_ready()
        sent = send_traffic(project, server.url, date(2002, 1, 1), date(2002, 7, 1))
    today = datetime.now(UTC).date()
    out = tmp_path / "out" / "log.parquet"
    done = export_log(project, today, today + timedelta(days=1), out, chunk_rows=100)  # several chunks
    assert done.rows == sent > 100 and done.labelled == sent
    table = pq.read_table(out)
    assert table.num_rows == sent and len(set(table.column("record_id").to_pylist())) == sent
    assert table.schema.field("created_at").type.tz == "UTC"
    probabilities = table.column("probability").to_pylist()
    assert all(0 <= p <= 1 for p in probabilities)
    assert set(table.column("feedback_label").to_pylist()) <= {0, 1}
    assert not list(out.parent.glob(".*partial"))

    before = export_log(project, today - timedelta(days=3), today, tmp_path / "empty.parquet")
    assert before.rows == 0 and pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    with pytest.raises(FlywheelError, match="must end after it starts"):
        export_log(project, today, today, tmp_path / "bad.parquet")

    cli = subprocess.run([sys.executable, "-m", "flywheel.cli", "log", "export", "--config",
                          str(project.path), "--from", today.isoformat(),
                          "--to", (today + timedelta(days=1)).isoformat(),
                          "--output", str(tmp_path / "cli.parquet")], capture_output=True, text=True,
                         env={**os.environ, "FLYWHEEL_HOME": str(project.home), "COLUMNS": "200"},
                         timeout=300)
    assert cli.returncode == 0 and f"{sent:,} predictions ({sent:,} with a label)" in cli.stdout, cli.stderr

    # retention: nothing served today is older than a day; three days on, all of it is
    prune = [sys.executable, "-m", "flywheel.cli", "log", "prune", "--config", str(project.path)]
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home), "COLUMNS": "200"}
    unset = subprocess.run(prune, capture_output=True, text=True, env=env, timeout=300)
    assert unset.returncode != 0 and "serving.log.retention_days" in unset.stdout + unset.stderr
    kept = subprocess.run([*prune, "--days", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert kept.returncode == 0 and "0 predictions and 0 labels" in kept.stdout, kept.stderr
    later = prune_log(project, days=1, at=datetime.now(UTC) + timedelta(days=3))
    assert later is not None and later.rows == sent and later.feedback == sent
    if state == "postgresql":  # today's rows went with their day's partition, not row by row
        assert f"predictions_p{today:%Y%m%d}" in later.partitions
    assert export_log(project, today, today + timedelta(days=1), tmp_path / "after.parquet").rows == 0
