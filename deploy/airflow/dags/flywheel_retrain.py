"""Flywheel's retraining pipeline as an Airflow DAG: one task per step, each `flywheel step NAME`.

Airflow never imports Flywheel: each task runs the `flywheel` command of the project's environment
(BashOperator here; a KubernetesPodOperator on the project's image at scale). The steps share one
pipeline run id and pass their outputs through Flywheel's state database, so the tasks may run on
different workers. Settings (Airflow Variables or environment):
  FLYWHEEL_BIN     the flywheel executable (default: flywheel on PATH)
  FLYWHEEL_CONFIG  the project's flywheel.yaml
The clock of a run is its logical date, so a backfill retrains as of that date.
"""

from __future__ import annotations

import os
import shlex

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

STEPS = ("extract", "features", "train", "evaluate", "promote", "alert")
FLYWHEEL_BIN = os.environ.get("FLYWHEEL_BIN", "flywheel")
FLYWHEEL_CONFIG = os.environ.get("FLYWHEEL_CONFIG", "flywheel.yaml")

with DAG(
    dag_id="flywheel_retrain",
    schedule=None,  # triggered by `flywheel run`'s triggers, an operator, or a schedule you add
    start_date=pendulum.datetime(2000, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"trigger": "airflow", "reason": "DAG run"},
    tags=["flywheel"],
) as dag:
    previous = None
    for name in STEPS:
        task = BashOperator(
            task_id=name,
            # A run's conf (params) is input from whoever triggers it: it reaches the command as
            # environment variables, never as text of the command, so `$(...)` in a reason stays
            # text. The settings of the deployment are quoted for the shell.
            bash_command=(
                f"{shlex.quote(FLYWHEEL_BIN)} step {name} --config {shlex.quote(FLYWHEEL_CONFIG)} "
                "--run-id airflow-{{ ts_nodash }} --at {{ ds }} "
                '--trigger "$RETRAIN_TRIGGER" --reason "$RETRAIN_REASON"'
            ),
            env={"RETRAIN_TRIGGER": "{{ params.trigger }}", "RETRAIN_REASON": "{{ params.reason }}"},
            append_env=True,
            retries=0,
        )
        if previous is not None:
            previous >> task
        previous = task
