"""Shadow scoring beside the log sink: while a shadow rollout runs (see `flywheel.lifecycle.rollout`),
the challenger scores the records the sink has logged and stores its answers in
`shadow_predictions`. The answered request never waits for it: the worker has already answered
with the champion when the records reach the sink.

It runs in a process of its own (`python -m flywheel.serving.tabular.shadow`, started by the sink
when serving has a registry to load from) at the lowest CPU priority the system grants
(`SCHED_IDLE`, else nice 19): on a core shared with the server it uses only the time the server
leaves idle, so the champion's latency does not pay for it. The sink forwards each batch after
committing it, without ever waiting: when the shadow process falls behind (a saturated core gives
it no idle time), batches are skipped and counted, and the rollout's evidence is the pairs that
were scored. Shadow answers are evidence, not the log: accounting of the log never depends on them.

The shadow process looks the running rollout up in the state database at most every
`CHECK_EVERY_S`, and loads the challenger from the registry as the worker loads a champion (the
ONNX export, hash-checked; never a pickle). A batch the challenger cannot score has no shadow
answers (the failure is logged, the rollout goes on).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from flywheel.data.engine import make_engine
from flywheel.serving.http.logs import configure_json_logging
from flywheel.serving.tabular.predlog import FRAME_HEADER, SHADOW_ENV, SINK_STATE_ENV
from flywheel.state import rollouts

__all__ = ["SHADOW_ENV", "ShadowFeed", "ShadowScorer", "ShadowTarget", "lowest_priority"]
log = logging.getLogger("flywheel.shadow")
CHECK_EVERY_S = 5.0  # how often the shadow process asks the state database whether a rollout runs
MAX_PENDING_BYTES = 8 << 20  # the sink holds at most this much for a shadow process behind it
FINISH_S = 30.0  # at a graceful stop, how long the sink waits for the shadow process to catch up
SKIP_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class ShadowTarget:
    """Where the shadow process finds the challenger: the project's registry and the serving
    settings."""

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


def lowest_priority() -> str:
    """Run this process only on CPU time nothing else wants: `SCHED_IDLE` where the system has it,
    else nice 19. Returns which."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))
    return f"nice {os.nice(0)}"


class ShadowFeed:
    """The sink's end: while a shadow rollout runs, each committed batch's frames go down a pipe to
    the shadow process (started at the first one) without waiting; what does not fit (the shadow
    process is behind) is skipped and counted."""

    def __init__(self, state_url: str, target_env: str, check_every_s: float = CHECK_EVERY_S,
                 on_skip: Callable[[int], None] | None = None):
        self.on_skip = on_skip  # counts the frames skipped (`flywheel_shadow_skipped_total`)
        self.env = {**os.environ, SINK_STATE_ENV: state_url, SHADOW_ENV: target_env}
        self.model_name = json.loads(target_env)["model_name"]
        self.check_every_s = check_every_s
        self.checked = float("-inf")
        self.active = False
        self.pending = bytearray()
        self.skipped_frames = 0
        self.logged_skips = 0.0
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        if self.proc is not None:
            log.error("shadow process exited; starting a new one", extra={
                "event": "shadow_error", "exit_code": self.proc.returncode})
        self.proc = subprocess.Popen([sys.executable, "-m", "flywheel.serving.tabular.shadow"],
                                     stdin=subprocess.PIPE, env=self.env)
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        with contextlib.suppress(OSError, AttributeError):  # room for a burst: 1 MiB, not 64 KiB
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        os.set_blocking(fd, False)
        self.pending.clear()

    def _follow(self, engine: sa.Engine) -> None:
        """Whether a shadow rollout runs (asked at most every `check_every_s`)."""
        if time.monotonic() - self.checked < self.check_every_s:
            return
        self.checked = time.monotonic()
        try:
            running = rollouts.running(engine, self.model_name)
        except Exception as exc:  # the state database is down: keep going as before
            log.warning("could not read the running rollout", extra={
                "event": "shadow_error", "error": str(exc)})
            return
        self.active = running is not None and running.mode == "shadow"

    def send(self, engine: sa.Engine, frames: list[bytes]) -> None:
        self._follow(engine)
        if not self.active:
            return
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        if len(self.pending) >= MAX_PENDING_BYTES:
            self.skipped_frames += len(frames)
            if self.on_skip is not None:
                self.on_skip(len(frames))
        else:
            for body in frames:  # one row counted per frame: the shadow process batches by bytes
                self.pending += FRAME_HEADER.pack(len(body), 1) + body
        self._flush()
        if self.skipped_frames and time.monotonic() - self.logged_skips > SKIP_LOG_EVERY_S:
            self.logged_skips = time.monotonic()
            log.warning("shadow scoring is behind; batches skipped", extra={
                "event": "shadow_skipped", "frames": self.skipped_frames})

    def _flush(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            while self.pending:
                n = os.write(self.proc.stdin.fileno(), self.pending)
                del self.pending[:n]
        except (BlockingIOError, BrokenPipeError):
            pass

    def close(self, wait_s: float = FINISH_S) -> None:
        """Hand over what is pending, close the pipe, and give the shadow process `wait_s` to store
        its last answers (they are evidence: after that it is stopped)."""
        if self.proc is None or self.proc.stdin is None:
            return
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline and self.proc.poll() is None:
            self._flush()
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            log.warning("shadow process stopped before it caught up", extra={"event": "shadow_skipped"})


class ShadowScorer:
    def __init__(self, target: ShadowTarget, check_every_s: float = CHECK_EVERY_S):
        self.target = target
        self.check_every_s = check_every_s
        self.checked = float("-inf")
        self.rollout_id: int | None = None
        self.model: Any = None
        self.failed_version: int | None = None
        self.error = ""  # the latest scoring failure

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
            with contextlib.suppress(Exception):  # the rollout's check aborts on it
                rollouts.note_failure(engine, running.id, 0, f"could not load "
                                      f"v{running.challenger_version} to score it: {exc}")

    def _load(self, version: int) -> Any:
        from flywheel.registry import Registry
        from flywheel.serving.tabular.runtime import load_version

        t = self.target
        registry = Registry(t.tracking_url, Path(t.artifact_root), t.experiment, t.model_name)
        return load_version(registry, version, threshold=t.threshold)

    def score(self, frames: list[bytes]) -> tuple[list[dict[str, Any]], int]:
        """The challenger's answers to the frames' records, as `shadow_predictions` rows (none when
        no shadow rollout runs), and the records it failed on (`error` says why)."""
        model, rollout_id = self.model, self.rollout_id
        if model is None or rollout_id is None:
            return [], 0
        rows = [row for body in frames for row in orjson.loads(body)]
        rows = [r for r in rows if r[3] == model.name]
        if not rows:
            return [], 0
        try:
            fields = model.answers.log_fields(model.predict([r[5] for r in rows]).tolist())
        except Exception as exc:
            self.error = f"v{model.version} could not score {len(rows)} records: {exc}"
            log.error("shadow scoring failed; the batch has no shadow answers", extra={
                "event": "shadow_error", "rows": len(rows), "error": str(exc)})
            return [], len(rows)
        out = []
        for r, f in zip(rows, fields, strict=True):
            value, label, scores = f[2] if len(f) > 2 else (None, None, None)
            out.append({"rollout_id": rollout_id, "record_id": r[0],
                        "created_at": datetime.fromtimestamp(r[2] / 1e6, UTC),
                        "model_version": model.version, "probability": f[0], "value": value,
                        "label": label, "scores": None if scores is None else json.dumps(scores)})
        return out, 0


def run(state_url: str, fd: int, scorer: ShadowScorer) -> int:
    """Score what the sink forwards until it closes the pipe; returns the answers stored. The
    records the challenger fails on are counted with the rollout (a guard rail of its check)."""
    from flywheel.serving.tabular.logsink import read_batches  # the sink imports this module

    engine = make_engine(state_url)
    stored = 0
    for frames in read_batches(fd, max_rows=64):
        scorer.refresh(engine)
        rollout_id = scorer.rollout_id
        answers, failed = scorer.score(frames)
        try:
            with engine.begin() as conn:
                rollouts.insert_shadow(conn, answers)
            stored += len(answers)
            if failed and rollout_id is not None:
                rollouts.note_failure(engine, rollout_id, failed, scorer.error)
        except Exception as exc:
            log.error("shadow answers not stored", extra={
                "event": "shadow_error", "rows": len(answers), "error": str(exc)})
    engine.dispose()
    return stored


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops when the sink closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    priority = lowest_priority()
    configure_json_logging()
    target = ShadowTarget.from_env(os.environ.get(SHADOW_ENV))
    if target is None:
        raise SystemExit(f"{SHADOW_ENV} is not set: this process is started by the log sink")
    stored = run(os.environ[SINK_STATE_ENV], sys.stdin.fileno(), ShadowScorer(target))
    log.info("shadow process finished", extra={"event": "shadow_stopped", "stored": stored,
                                                 "priority": priority})


if __name__ == "__main__":
    main()
