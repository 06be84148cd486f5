"""`flywheel serve`: uvicorn workers over the app, with metrics and logs set up for all of them."""

from __future__ import annotations

import os
import shutil

from flywheel.config import LlmProject, Project


def serve(project: Project | LlmProject, host: str | None = None, port: int | None = None,
          workers: int | None = None) -> None:
    from flywheel.serving.logsink import sink_cpus

    sink_cpus(os.environ)  # a bad CPU list fails here, before any worker starts
    cfg = project.config.serving
    # Set before anything imports prometheus_client: workers write their samples here.
    prom_dir = project.home / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    os.environ["FLYWHEEL_CONFIG"] = str(project.path)
    os.environ["FLYWHEEL_HOME"] = str(project.home)

    import uvicorn

    from flywheel.serving.logs import configure_json_logging
    from flywheel.state.db import open_state

    configure_json_logging(access_log=cfg.access_log)
    open_state(project.state_url).dispose()  # migrate once, before the workers start
    uvicorn.run(
        "flywheel.serving.app:app_from_env", factory=True,
        host=host or cfg.host, port=port or cfg.port, workers=workers or cfg.workers,
        loop="uvloop", http="httptools", access_log=cfg.access_log, log_config=None,
        timeout_graceful_shutdown=30, server_header=False,
    )
