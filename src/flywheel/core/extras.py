"""Optional parts of Flywheel and the pip extra that installs each.

The tabular core (train, serve, predict, monitor, retrain with the local runner) needs none of
them. Where an extra is missing, a default that works without it is used and one line says what
installing it adds; asking for the part explicitly is a `MissingExtra` error that names the extra.
"""

from __future__ import annotations

import importlib.util

from flywheel.core.errors import FlywheelError

# extra -> (the module that proves it is installed, what it adds)
EXTRAS: dict[str, tuple[str, str]] = {
    "prefect": ("prefect", "the embedded Prefect orchestrator for retraining runs"),
    "reports": ("evidently", "Evidently's HTML/JSON drift report beside each monitoring verdict"),
    "mlp": ("torch", "the PyTorch MLP trainer (model.type: torch-mlp)"),
    "llm": ("peft", "LoRA fine-tuning and serving of language models (kind: lora)"),
    "xgboost": ("xgboost", "reading XGBoost models (flywheel import)"),
}


class MissingExtra(FlywheelError):
    """A part of Flywheel was asked for whose extra is not installed."""


def installed(extra: str) -> bool:
    module = EXTRAS[extra][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def how_to_install(extra: str) -> str:
    hint = "; install the CPU build of torch first: pip install torch --index-url " \
           "https://download.pytorch.org/whl/cpu" if extra in ("mlp", "llm") else ""
    return f"pip install 'mlflywheel[{extra}]'{hint}"


def require(extra: str, wanted: str) -> None:
    """Raise `MissingExtra` naming the extra when it is not installed."""
    if not installed(extra):
        raise MissingExtra(f"{wanted} needs {EXTRAS[extra][1]}, which is not installed here: "
                           f"{how_to_install(extra)}")


def without(extra: str, fallback: str) -> str:
    """The one line said when a default runs without an extra."""
    return f"{fallback} ({how_to_install(extra)} adds {EXTRAS[extra][1]})"
