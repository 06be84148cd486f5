"""Canary routing in each server worker: while a canary rollout runs (see
`flywheel.lifecycle.rollout`), the challenger answers a share of the traffic, the same entities
always.

Each worker follows the running rollout in the state database every `serving.reload_interval_s`
(the rollout's answers count only from one interval after it started, so every worker and replica
agrees by then), loads the challenger as it loads a champion (the ONNX export, hash-checked) and
swaps the route in with one reference assignment: a request in flight finishes on the route it
took. A record goes to the challenger when a hash of its entity (`rollout.entity`: an input field
or a `meta` key) falls in the share; a record without one is routed at random with the same
chance. Both keep the assignment independent of anything about the record, which the decision's
weighted test needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from flywheel.serving.tabular.runtime import LoadedModel
from flywheel.serving.tabular.validation import META
from flywheel.state import rollouts

log = logging.getLogger("flywheel.serving")
BUCKETS = 10_000


def bucket(value: Any) -> int:
    """An entity's bucket in [0, BUCKETS): the same in every worker, replica and release."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class Canary:
    rollout_id: int
    share: float
    model: LoadedModel  # the challenger
    entity: str  # an input field, or meta.KEY

    def takes(self, record: dict[str, Any]) -> bool:
        """Whether the challenger answers this record."""
        if self.entity.startswith("meta."):
            meta = record.get(META)
            key = meta.get(self.entity[5:]) if isinstance(meta, dict) else None
        else:
            key = record.get(self.entity)
        if key is None:
            return random.random() < self.share
        return bucket(key) < round(self.share * BUCKETS)


class CanaryRoute:
    """The running canary of one worker (`active`: None when no canary rollout runs)."""

    def __init__(self, engine: sa.Engine, model_name: str, entity: str, interval_s: float,
                 load: Callable[[int], LoadedModel]):
        self.engine = engine
        self.model_name = model_name
        self.entity = entity
        self.interval_s = interval_s
        self.load = load
        self.active: Canary | None = None
        self.failed_version: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> None:
        try:
            running = rollouts.running(self.engine, self.model_name)
        except Exception as exc:  # the state database is down: keep the route we have
            log.warning("could not read the running rollout", extra={
                "event": "canary_error", "error": str(exc)})
            return
        if running is None or running.mode != "canary" or not running.share:
            if self.active is not None:
                log.info("canary ended", extra={"event": "canary_stop", "rollout": self.active.rollout_id})
            self.active = None
            return
        if self.active is not None and self.active.rollout_id == running.id:
            return
        if running.challenger_version == self.failed_version:
            return
        try:
            model = self.load(running.challenger_version)
        except Exception as exc:
            self.failed_version = running.challenger_version
            log.error("could not load the canary's challenger; the champion answers everything",
                      extra={"event": "canary_error", "version": running.challenger_version,
                             "error": str(exc)})
            with contextlib.suppress(Exception):  # the rollout's check aborts on it
                rollouts.note_failure(self.engine, running.id, 0, f"a server could not load "
                                      f"v{running.challenger_version}: {exc}")
            return
        self.active = Canary(running.id, running.share, model, self.entity)
        log.info("canary started", extra={"event": "canary_start", "rollout": running.id,
                                           "version": model.version, "share": running.share})

    def start(self) -> None:
        self.check_now()
        self._thread = threading.Thread(target=self._watch, name="canary-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_now()
