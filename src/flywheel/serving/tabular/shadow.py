"""Shadow scoring in the log sink: while a shadow rollout runs (see `flywheel.lifecycle.rollout`),
the sink scores the challenger on the records of each batch it writes, in the same transaction,
into `shadow_predictions`. The answered request never waits for it: the worker has already
answered with the champion when the records reach the sink.

The sink learns what to load from the worker (`SHADOW_ENV`: the registry's coordinates), looks the
running rollout up in the state database at most every `CHECK_EVERY_S`, and loads the challenger
from the registry as the worker loads a champion (the ONNX export, hash-checked; never a pickle).
Shadow answers are evidence, not the log: a batch the challenger cannot score is logged for the
champion as always and has no shadow answers (the failure is logged, the rollout goes on).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from flywheel.serving.tabular.predlog import SHADOW_ENV
from flywheel.state import rollouts

__all__ = ["SHADOW_ENV", "ShadowScorer", "ShadowTarget"]
log = logging.getLogger("flywheel.logsink")
CHECK_EVERY_S = 5.0  # how often the sink asks the state database whether a shadow rollout runs
# Records scored per challenger call: on a core shared with the worker, a longer stretch of work
# without a yield delays every request in flight by its length.
SLICE_ROWS = 16


@dataclass(frozen=True)
class ShadowTarget:
    """Where the sink finds the challenger: the project's registry and the serving settings."""

    tracking_url: str
    artifact_root: str
    experiment: str
    model_name: str
    threshold: float = 0.5

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls, value: str | None) -> ShadowTarget | None:
        return cls(**json.loads(value)) if value else None


class ShadowScorer:
    def __init__(self, target: ShadowTarget, check_every_s: float = CHECK_EVERY_S):
        self.target = target
        self.check_every_s = check_every_s
        self.checked = float("-inf")
        self.rollout_id: int | None = None
        self.model: Any = None
        self.failed_version: int | None = None

    def refresh(self, engine: sa.Engine) -> None:
        """Follow the running shadow rollout (at most every `check_every_s`)."""
        if time.monotonic() - self.checked < self.check_every_s:
            return
        self.checked = time.monotonic()
        try:
            running = rollouts.running(engine, self.target.model_name)
        except Exception as exc:  # the state database is down: keep what is loaded
            log.warning("could not read the running rollout", extra={
                "event": "shadow_error", "error": str(exc)})
            return
        if running is None or running.mode != "shadow":
            self.rollout_id = None  # the model stays loaded: the next rollout may shadow it again
            return
        if running.id == self.rollout_id or running.challenger_version == self.failed_version:
            return
        try:
            if self.model is None or self.model.version != running.challenger_version:
                self.model = self._load(running.challenger_version)
            self.rollout_id = running.id
            log.info("shadow scoring", extra={"event": "shadow_start", "rollout": running.id,
                                              "version": running.challenger_version})
        except Exception as exc:
            self.failed_version, self.model, self.rollout_id = running.challenger_version, None, None
            log.error("could not load the shadow rollout's challenger", extra={
                "event": "shadow_error", "version": running.challenger_version, "error": str(exc)})

    def _load(self, version: int) -> Any:
        from flywheel.registry import Registry
        from flywheel.serving.tabular.runtime import load_version

        t = self.target
        registry = Registry(t.tracking_url, Path(t.artifact_root), t.experiment, t.model_name)
        return load_version(registry, version, threshold=t.threshold)

    def score(self, frames: list[bytes]) -> list[dict[str, Any]]:
        """The challenger's answers to the frames' records, as `shadow_predictions` rows (none when
        no shadow rollout runs, or when scoring fails)."""
        model, rollout_id = self.model, self.rollout_id
        if model is None or rollout_id is None:
            return []
        try:
            rows = [row for body in frames for row in orjson.loads(body)]
            rows = [r for r in rows if r[3] == model.name]
            if not rows:
                return []
            fields = []
            for start in range(0, len(rows), SLICE_ROWS):  # the core may be the worker's: yield
                records = [r[5] for r in rows[start:start + SLICE_ROWS]]  # meta is no input
                fields += model.answers.log_fields(model.predict(records).tolist())
                os.sched_yield()
        except Exception as exc:
            log.error("shadow scoring failed; the batch has no shadow answers", extra={
                "event": "shadow_error", "rows": len(frames), "error": str(exc)})
            return []
        out = []
        for r, f in zip(rows, fields, strict=True):
            value, label, scores = f[2] if len(f) > 2 else (None, None, None)
            out.append({"rollout_id": rollout_id, "record_id": r[0],
                        "created_at": datetime.fromtimestamp(r[2] / 1e6, UTC),
                        "model_version": model.version, "probability": f[0], "value": value,
                        "label": label, "scores": None if scores is None else json.dumps(scores)})
        return out
