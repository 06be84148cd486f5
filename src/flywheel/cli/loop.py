"""Commands of the closed loop: demo, example, replay, monitor, retrain, step, run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flywheel import api
from flywheel.cli import render
from flywheel.cli.common import DEFAULT_CONFIG, AtOpt, ConfigOpt, clock, command, print_json, reporter, say

if TYPE_CHECKING:
    from flywheel.demo.sba import DemoData
    from flywheel.lifecycle.train import TrainResult


def register(app: typer.Typer) -> None:
    """The commands of this module, on the `flywheel` app (in the order --help lists them)."""
    for name, fn in (("demo", demo), ("example", example), ("replay", replay), ("monitor", monitor),
                     ("retrain", retrain), ("step", step), ("run", run)):
        command(app, name)(fn)


def demo(
    config: ConfigOpt = DEFAULT_CONFIG,
    replay: Annotated[bool, typer.Option(help="Replay FY2002-2010 through the loop after training.")] = True,
    quarters: Annotated[int, typer.Option(min=1, max=36, help="Quarters to replay from FY2002 Q1.")] = 36,
) -> None:
    """The whole loop on the SBA loans: load, train, serve, replay 2002-2010, monitor, retrain, report."""
    project = api.load(config)

    def trained(data: DemoData, first: TrainResult, replaying: bool) -> None:
        render.demo_data(data)
        render.trained(project, first)
        if replaying:
            say(f"Replaying {quarters} quarters from FY2002 Q1 as live traffic "
                "(server, prediction log, feedback, monitoring, triggers, retraining)...")

    with reporter() as rep:
        done = api.demo(project, rep, replay, quarters, say=lambda m: say(f"  {m}"), trained=trained)
    render.demo(project, done)


def example(
    name: Annotated[str, typer.Argument(help="flights (regression) or bikeshare (multiclass).")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Default: examples/NAME/flywheel.yaml.")] = None,
    limit: Annotated[int | None, typer.Option(
        min=1, help="Send only this many of the arriving rows (a quick run).")] = None,
) -> None:
    """An example project on its real data: fetch it, train on the history, serve the rest as live
    traffic with its labels, monitor, retrain on the feedback, hot-swap the new champion."""
    with reporter() as rep:
        done = api.example(name, config, limit, rep, say=lambda m: say(f"  {m}"))
    render.example(api.load(config or Path("examples") / name / "flywheel.yaml"), done)


def replay(
    config: ConfigOpt = DEFAULT_CONFIG,
    quarters: Annotated[int, typer.Option(min=1, max=36, help="Quarters to replay from FY2002 Q1.")] = 36,
) -> None:
    """Replay FY2002-2010 through the loop on a project `flywheel demo --no-replay` prepared."""
    say(f"Replaying {quarters} quarters from FY2002 Q1 as live traffic "
        "(server, prediction log, feedback, monitoring, triggers, retraining)...")
    render.replay(api.replay(api.load(config), quarters, say=lambda m: say(f"  {m}")))


def monitor(
    config: ConfigOpt,
    size: Annotated[int | None, typer.Option(help="Window: the latest N predictions.")] = None,
    hours: Annotated[float | None, typer.Option(help="Window: the latest H hours of predictions.")] = None,
    start: Annotated[str | None, typer.Option(
        "--from", help="Window by event time from DATE (with --to): the rows' own time, as in a backfill."
    )] = None,
    end: Annotated[str | None, typer.Option(
        "--to", help="Window by event time: up to DATE (excluded).")] = None,
    report: Annotated[bool | None, typer.Option(
        "--report/--no-report", help="Write Evidently's HTML/JSON report to MLflow (default: when "
                                     "Evidently is installed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Drift, estimated performance (before labels) and realized performance of a window of the
    prediction log against the training reference; audits earlier windows whose labels arrived."""
    verdict = api.monitor(api.load(config), size, hours, start, end, report)
    print_json(verdict) if as_json else render.verdict(verdict)


def retrain(
    config: ConfigOpt,
    orchestrator: Annotated[str | None, typer.Option(help="local or prefect (default: config).")] = None,
    trigger: Annotated[str, typer.Option(help="What started this run (recorded).")] = "manual",
    reason: Annotated[str, typer.Option(help="Why (recorded, alerted).")] = "requested from the CLI",
    at: AtOpt = None,
) -> None:
    """Run the retraining pipeline once: extract, features, train, evaluate, promote, alert."""
    run = api.retrain(api.load(config), clock(at), orchestrator, reason, trigger)
    render.pipeline_run(run)
    if run.status != "succeeded":
        raise typer.Exit(1)


def step(
    name: Annotated[str, typer.Argument(help="extract | features | train | evaluate | promote | alert")],
    config: ConfigOpt,
    run_id: Annotated[str, typer.Option("--run-id", help="The pipeline run this step belongs to.")],
    trigger: Annotated[str, typer.Option(help="Recorded when the run is created.")] = "external",
    reason: Annotated[str, typer.Option(help="Recorded when the run is created.")] = "orchestrator",
    at: AtOpt = None,
) -> None:
    """Run one pipeline step (what the Airflow DAG's tasks call); outputs go to the state DB."""
    print_json(api.step(api.load(config), name, run_id, trigger, reason, clock(at)))


def run(
    config: ConfigOpt,
    serve: Annotated[bool, typer.Option(
        "--serve/--no-serve", help="Also serve the champion (--no-serve: only the pipeline runner, "
                                   "beside servers deployed on their own).")] = True,
    once: Annotated[bool, typer.Option(
        "--once", help="One check (monitor, triggers, retrain if triggered), then exit: for a "
                       "scheduler such as a Kubernetes CronJob. Implies --no-serve.")] = False,
) -> None:
    """Serve the champion and, every retraining.check_interval_s, monitor and retrain when triggered."""
    api.run(api.load(config), say, serve=serve, once=once)
