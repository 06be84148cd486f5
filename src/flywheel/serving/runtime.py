"""The served model: loaded from the registry (hash-checked ONNX), warmed, and hot-swapped.

A `LoadedModel` is immutable. The runtime holds a reference to the current one; a request takes
that reference once and finishes on it, so a swap (one reference assignment) never disturbs
requests in flight, and the old model is freed when the last of them is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from flywheel.core.times import EventTimes
from flywheel.data.features import FeatureSpec, RowFn, row_function
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.answers import TaskAnswers
from flywheel.serving.validation import RecordValidator
from flywheel.training.onnx import ONNX_INPUT, TASK_OUTPUT, new_session

log = logging.getLogger("flywheel.serving")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    run_id: str
    spec: FeatureSpec
    session: Any  # onnxruntime.InferenceSession
    features_of: RowFn
    validator: RecordValidator
    lineage: dict[str, Any]
    answers: TaskAnswers
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def output(self) -> list[str]:
        return [TASK_OUTPUT.get(self.spec.task, TASK_OUTPUT["binary"])]

    def predict(self, records: list[dict[str, Any]]) -> np.ndarray:
        """The model's output for valid records (raw input fields): P(positive), the value, or
        (records, classes) probabilities."""
        features_of = self.features_of
        X = np.array([features_of(r) for r in records], dtype=np.float32)
        return self.session.run(self.output, {ONNX_INPUT: X})[0]

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        return self.session.run(self.output, {ONNX_INPUT: np.ascontiguousarray(X, np.float32)})[0]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "run_id": self.run_id,
            "loaded_at": self.loaded_at.isoformat(), "lineage": self.lineage,
            "inputs": [{"name": n, "type": t, "nullable": n in self.spec.nullable_inputs}
                       for n, t in self.spec.input_types.items()],
            "features": self.spec.names,
            "task": self.spec.task, **({"classes": self.spec.classes} if self.spec.classes else {}),
        }


def load_version(registry: Registry, version: int, max_records: int = 1000,
                 max_string_length: int = 1000, threshold: float = 0.5,
                 times: EventTimes | None = None) -> LoadedModel:
    """Download, verify hashes, build the session and warm it up."""
    info = registry.version(version)
    artifacts = registry.load_artifacts(version)  # refuses a file whose hash does not match
    spec = FeatureSpec.from_json(artifacts.feature_spec)
    model = LoadedModel(
        name=registry.model_name, version=version, run_id=info.run_id, spec=spec,
        session=new_session(artifacts.onnx), features_of=row_function(spec),
        validator=RecordValidator(spec, max_records, max_string_length, times),
        lineage={
            "run_id": info.run_id, "model_type": info.run_tags.get("model_type"),
            "data_hash": info.run_tags.get("data_hash"), "git_sha": info.run_tags.get("git_sha"),
            "trained_on": {"from": info.run_tags.get("window_start"),
                           "to": info.run_tags.get("window_end"),
                           "as_of": info.run_tags.get("as_of"),
                           "rows": int(info.run_tags.get("rows") or 0)},
            "gate": info.tags.get("gate"),
        },
        answers=TaskAnswers.of(spec, threshold),
    )
    warm_up(model)
    return model


def warm_up(model: LoadedModel, rounds: int = 20) -> None:
    """Run the first predictions before the model takes traffic (ORT allocates lazily)."""
    record = {n: (0.0 if t == "number" else "") for n, t in model.spec.input_types.items()}
    for size in (1, 8):
        for _ in range(rounds):
            model.predict([record] * size)


class Servable(Protocol):
    @property
    def version(self) -> int: ...


M = TypeVar("M", bound=Servable)


class ModelRuntime(Generic[M]):
    """Holds the current champion and follows the alias from a background thread.

    `loader(registry, version)` builds what is served: an ONNX model here, a merged LoRA
    generator for fine-tuning projects.
    """

    def __init__(self, registry_factory: Callable[[], Registry], interval_s: float,
                 loader: Callable[[Registry, int], M],
                 on_swap: Callable[[M | None, M], None] | None = None):
        self._registry_factory = registry_factory
        self._registry: Registry | None = None
        self.interval_s = interval_s
        self.loader = loader
        self.current: M | None = None
        self.on_swap = on_swap
        self.last_error: str | None = None
        self._failing_since: float | None = None  # time.monotonic() of the first failed check
        self._last_warned = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one check at a time (watcher and /admin/reload)
        self._thread: threading.Thread | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def check_now(self) -> bool:
        """Load and swap in the champion if it moved; True if a swap happened."""
        with self._lock:
            try:
                target = self.registry.alias_version(CHAMPION)
            except Exception as exc:  # registry unreachable: keep serving what we have
                now = time.monotonic()
                if self._failing_since is None or now - self._last_warned >= 60:
                    log.warning("registry check failed; serving the loaded model and retrying",
                                extra={"event": "registry_error", "error": str(exc)})
                    self._last_warned = now
                self._failing_since = self._failing_since or now
                self.last_error = f"registry: {exc}"
                return False
            if self._failing_since is not None:
                log.info("registry reachable again", extra={
                    "event": "registry_recovered",
                    "after_s": round(time.monotonic() - self._failing_since, 1)})
                self._failing_since = None
                if self.last_error and self.last_error.startswith("registry: "):
                    self.last_error = None
            current = self.current
            if target is None or (current is not None and current.version == target):
                return False
            try:
                new = self.loader(self.registry, target)
            except Exception as exc:
                self.last_error = f"loading v{target}: {exc}"
                log.error("model load failed", extra={"event": "load_failed", "version": target,
                                                       "error": str(exc)})
                return False
            self.current = new  # the swap: requests in flight keep their reference to `current`
            self.last_error = None
            log.info("model swapped", extra={
                "event": "model_swapped", "version": new.version,
                "previous_version": current.version if current else None})
            if self.on_swap:
                self.on_swap(current, new)
            return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="champion-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_now()
