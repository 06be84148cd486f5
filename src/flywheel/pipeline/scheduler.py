"""`flywheel run`: the long-running process that serves and, on a timer, monitors and retrains."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import date
from typing import Any

from flywheel.config import Project


def check_once(project: Project, at: date | None = None, say: Callable[[str], None] = print) -> Any:
    """One tick: monitor the latest window, decide, and run the pipeline if a trigger fired."""
    from flywheel.monitoring.monitor import MonitorError, run_monitor
    from flywheel.pipeline.retrain import get_watermark, labelled_rows_since, orchestrate
    from flywheel.pipeline.triggers import due_trigger, last_retrain_clock

    clock = at or date.today()
    verdict = None
    try:
        verdict = run_monitor(project)
        say(f"monitor: {verdict.summary()}")
    except MonitorError as exc:
        say(f"monitor: skipped ({exc})")
    new_rows = None
    if project.config.retraining.triggers.new_labelled_rows:
        new_rows = labelled_rows_since(project, get_watermark(project), clock)
    decision = due_trigger(project, clock, verdict, last_retrain_clock(project), new_rows)
    if decision is None:
        return None
    say(f"trigger {decision.trigger}: {decision.reason}")
    run = orchestrate(project, decision.trigger, decision.reason, clock)
    say(f"pipeline run {run.id}: {run.status}, v{run.version} "
        f"{'promoted' if run.promoted else 'not promoted'}")
    return run


def run_forever(project: Project, say: Callable[[str], None] = print) -> None:
    """Serve in a child process and check triggers every `check_interval_s` until SIGTERM/SIGINT."""
    from flywheel.serving.process import ServerProcess

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = project.config
    server = ServerProcess(project, port=cfg.serving.port, workers=cfg.serving.workers)
    try:
        server.wait_ready()
        say(f"serving on {server.url}; checking triggers every {cfg.retraining.check_interval_s:g}s")
        while not stop.wait(cfg.retraining.check_interval_s):
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server.tail()}")
            try:
                check_once(project, say=say)
            except Exception as exc:  # a failed tick is alerted by the step; keep serving
                say(f"check failed: {type(exc).__name__}: {exc}")
    finally:
        server.stop()
