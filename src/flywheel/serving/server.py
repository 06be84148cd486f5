"""`flywheel serve`: uvicorn workers over the app, with metrics and logs set up for all of them."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import uvicorn

from flywheel.config import ConnectionLimits, LlmProject, Project
from flywheel.lifecycle.aliases import reconcile_aliases
from flywheel.registry import Registry
from flywheel.room.app import check_listen, create_room_app, record_serving_address
from flywheel.serving.http.logs import LOG_LEVEL_ENV, configure_json_logging
from flywheel.serving.http.protocol import LIMITS_ENV, GuardedHttpToolsProtocol
from flywheel.serving.tabular.logsink import sink_cpus
from flywheel.state.db import close_state, open_state


def metrics_dir(home: Path) -> Path:
    """This server's own folder of metric samples, empty: servers that share a home (replicas on
    one volume, containers run as different users) never mix or wipe each other's. Folders of
    this host's servers that are gone are removed."""
    root, host = home / "prometheus", socket.gethostname()
    for old in root.glob(f"{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"{host}-{os.getpid()}"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(parents=True)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _set_limits(limits: ConnectionLimits) -> None:
    os.environ[LIMITS_ENV] = json.dumps({"max_header_bytes": limits.max_header_bytes,
                                         "header_timeout_s": limits.header_timeout_s,
                                         "body_timeout_s": limits.body_timeout_s})


def serve_room(project: Project | LlmProject, host: str, port: int) -> None:
    """`flywheel room` on its own port, with the prediction server's connection guards (header
    size and time, body time, keep-alive, connections at once from `serving.connections`)."""
    limits = project.config.serving.connections
    _set_limits(limits)
    uvicorn.run(create_room_app(project), host=host, port=port, log_level="warning",
                loop="uvloop", http=GuardedHttpToolsProtocol, server_header=False,
                timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections)


def serve(project: Project | LlmProject, host: str | None = None, port: int | None = None,
          workers: int | None = None, log_level: str | None = None) -> None:
    sink_cpus(os.environ)  # a bad CPU list fails here, before any worker starts
    cfg = project.config.serving
    # Workers write their metric samples here; prometheus_client reads the variable when it is
    # first imported, which nothing above does.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(project.home))
    os.environ["FLYWHEEL_CONFIG"] = str(project.path)
    os.environ["FLYWHEEL_HOME"] = str(project.home)
    limits = cfg.connections
    _set_limits(limits)
    if project.config.room.mount_on_serve:
        check_listen(host or cfg.host)  # the room at /room needs a viewer token beyond loopback
    if log_level:
        os.environ[LOG_LEVEL_ENV] = log_level  # the workers read it too
    configure_json_logging(access_log=cfg.access_log)
    # Migrate once, before the workers start; finish any alias move a dead process left, so the
    # workers load the champion the state database records.
    reconcile_aliases(Registry.for_project(project), open_state(project.state_url))
    close_state(project.state_url)
    record_serving_address(project.home, host or cfg.host, port or cfg.port)  # for `flywheel room`
    uvicorn.run(
        "flywheel.serving.asgi:app_from_env", factory=True,
        host=host or cfg.host, port=port or cfg.port, workers=workers or cfg.workers,
        loop="uvloop", http=GuardedHttpToolsProtocol, access_log=cfg.access_log, log_config=None,
        timeout_graceful_shutdown=30, server_header=False,
        timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
    )
