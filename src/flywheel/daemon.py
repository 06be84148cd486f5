"""`flywheel run`: the long-running process that serves and, on a timer, monitors and retrains."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from flywheel.config import Project
from flywheel.lifecycle.prediction_log import prune_log
from flywheel.pipeline.scheduler import check_once
from flywheel.serving.process import ServerProcess


def run_forever(project: Project, say: Callable[[str], None] = print, serve: bool = True,
                once: bool = False) -> None:
    """Serve in a child process and check triggers every `check_interval_s` until SIGTERM/SIGINT.
    With `serve=False` only the checks run: the pipeline runner beside servers deployed on their
    own (replicas behind a load balancer), which follow the champion alias it moves. With
    `once=True` (and no server) one check runs and the call returns: a scheduler's job (a
    Kubernetes CronJob) instead of a long-running process."""
    if once:
        if serve:
            raise ValueError("a single check (once) runs without a server (serve=False)")
        _tick(project, say)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = project.config
    server = ServerProcess(project, port=cfg.serving.port, workers=cfg.serving.workers) if serve else None
    every = f"checking triggers every {cfg.retraining.check_interval_s:g}s"
    try:
        if server is not None:
            server.wait_ready()
        say(f"serving on {server.url}; {every}" if server is not None else f"not serving; {every}")
        while not stop.wait(cfg.retraining.check_interval_s):
            if server is not None and server.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server.tail()}")
            try:
                _tick(project, say)
            except Exception as exc:  # a failed tick is alerted by the step; keep serving
                say(f"check failed: {type(exc).__name__}: {exc}")
    finally:
        if server is not None:
            server.stop()


def _tick(project: Project, say: Callable[[str], None]) -> None:
    """The log's retention (when set), then one check of the loop."""
    pruned = prune_log(project)
    if pruned is not None and (pruned.rows or pruned.feedback):
        say(f"log retention: {pruned.rows:,} predictions and {pruned.feedback:,} labels older than "
            f"{pruned.cutoff:%Y-%m-%d %H:%M} UTC removed ({len(pruned.partitions)} partitions dropped)")
    check_once(project, say=say)
