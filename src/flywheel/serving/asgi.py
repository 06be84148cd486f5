"""The factory uvicorn's workers call: the app for the project in FLYWHEEL_CONFIG, of its kind,
composed with the control room when `room.mount_on_serve` asks for it."""

from __future__ import annotations

import os
from typing import Any

from starlette.routing import BaseRoute

from flywheel.config import LlmProject, load_any_project
from flywheel.room.app import room_mount
from flywheel.serving.generation.app import create_generate_app
from flywheel.serving.http.logs import configure_json_logging
from flywheel.serving.http.runtime import ModelRuntime
from flywheel.serving.tabular.app import create_app


def app_from_env() -> Any:
    project = load_any_project(os.environ["FLYWHEEL_CONFIG"])
    configure_json_logging(access_log=project.config.serving.access_log)  # type: ignore[attr-defined]
    def mounts(runtime: ModelRuntime[Any]) -> list[BaseRoute]:
        return room_mount(project, runtime)  # type: ignore[return-value]

    if isinstance(project, LlmProject):
        return create_generate_app(project, migrate=False, mounts=mounts)
    return create_app(project, migrate=False, mounts=mounts)
