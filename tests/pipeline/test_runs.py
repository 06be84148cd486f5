"""Pipeline run records: what the room and `flywheel status` show people who hold no secrets."""

from datetime import date

from flywheel.pipeline.runs import fail_run, load_run, save_step, start_run
from flywheel.room.data import pipelines


def test_a_failed_steps_error_is_stored_without_url_passwords(make_project):
    project = make_project()
    run_id = start_run(project, "manual", "test", date(2005, 1, 1))
    save_step(project, run_id, "extract", None, "failed",
              "extract: could not connect to postgresql://loader:s3cr3t@db.internal:5432/loans")
    assert "s3cr3t" not in (load_run(project, run_id).error or "")
    assert "postgresql://loader:***@db.internal" in load_run(project, run_id).error
    other = start_run(project, "manual", "test", date(2005, 1, 1))
    fail_run(project, other, "mysql://u:pw@h/x timed out")
    shown = str(pipelines(project))
    assert "s3cr3t" not in shown and ":pw@" not in shown and "***" in shown
