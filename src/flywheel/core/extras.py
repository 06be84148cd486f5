"""Optional parts of Flywheel and the pip extra that installs each.

The base serves a registered tabular model and nothing more (the slim serving image); `[train]`
adds the tabular loop (train, evaluate, predict files, monitor, retrain with the local runner),
and every other extra adds to that loop. Where an extra is missing, a default that works without
it is used and one line says what installing it adds; asking for the part explicitly is a
`MissingExtra` error that names the extra, and so is a command that needs the loop's libraries
where only the base is installed (`missing_extra`).
"""

from __future__ import annotations

import importlib.util

from flywheel.core.errors import FlywheelError

# extra -> (the module that proves it is installed, what it adds)
EXTRAS: dict[str, tuple[str, str]] = {
    "train": ("lightgbm", "the tabular loop (train, evaluate, predict files, monitor, retrain)"),
    "prefect": ("prefect", "the embedded Prefect orchestrator for retraining runs"),
    "reports": ("evidently", "Evidently's HTML/JSON drift report beside each monitoring verdict"),
    "mlp": ("torch", "the PyTorch MLP trainer (model.type: torch-mlp)"),
    "llm": ("peft", "LoRA fine-tuning and serving of language models (kind: lora)"),
    "xgboost": ("xgboost", "reading XGBoost models (flywheel import)"),
    "spark": ("pyspark", "Apache Spark as the feature engine (data.engine: spark)"),
    "llamacpp": ("llama_cpp", "llama.cpp, which runs the GGUF export of a LoRA model"),
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


# The top-level modules `[train]` installs: a command that imports one where only the base is
# installed needs that extra.
TRAIN_MODULES = frozenset({"pandas", "duckdb", "lightgbm", "sklearn", "onnx", "onnxmltools", "skl2onnx",
                           "matplotlib", "pyarrow", "scipy"})


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The `MissingExtra` to report for a failed import of one of an extra's libraries, else None."""
    top = (exc.name or "").split(".")[0]
    for extra, (module, _) in EXTRAS.items():
        if top == module or (extra == "train" and top in TRAIN_MODULES):
            return MissingExtra(f"this command needs {EXTRAS[extra][1]}, which is not installed here "
                                f"(no module {top}): {how_to_install(extra)}")
    return None
