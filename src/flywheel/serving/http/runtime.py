"""The champion runtime both servers share: holds what is served (an ONNX model, a LoRA
generator), follows the champion alias from a background thread and hot-swaps it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from flywheel.registry import CHAMPION, Registry

log = logging.getLogger("flywheel.serving")


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
