"""The factory uvicorn's workers call: the app for the project in FLYWHEEL_CONFIG, of its kind."""

from __future__ import annotations

import os
from typing import Any

from flywheel.config import LlmProject, load_any_project
from flywheel.serving.app import create_app
from flywheel.serving.generate import create_generate_app
from flywheel.serving.logs import configure_json_logging


def app_from_env() -> Any:
    project = load_any_project(os.environ["FLYWHEEL_CONFIG"])
    configure_json_logging(access_log=project.config.serving.access_log)  # type: ignore[attr-defined]
    if isinstance(project, LlmProject):
        return create_generate_app(project, migrate=False)
    return create_app(project, migrate=False)
