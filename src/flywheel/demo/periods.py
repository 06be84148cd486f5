"""A project's later rows replayed month by month through the loop, under its rollout policy.

Where labels come back quickly (a flight's delay the same day, an hour's weather at once), the
rollout step can show what it is for. The rows before `data.window.end` train v1; then each month
in turn:

1. its rows arrive as live traffic at a real `flywheel serve` (the champion answers; in a shadow
   rollout the sink's shadow process scores the challenger on the same records);
2. their labels are posted back to `/v1/feedback`;
3. the daemon's rollout check runs at the month's end (`check_rollout` on the project's clock):
   promote, abort or go on;
4. the month's rows reach the source table and the retraining pipeline runs at the month's end,
   as a monthly schedule would: gate, then promote (`rollout.mode: direct`) or start a rollout.

Every month is scored three ways on its own rows: the version that served it (the loop), the
version retrained at the previous month's end whether or not it was promoted (retraining every
period), and, for each promotion, the new champion against the one it replaced on the next month
(a promotion that lost). Run it once per policy on fresh project homes (`benchmarks/
rollout_policies.py` does both and sets them side by side); nothing here is tuned on the months
it reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date
from typing import Any

import httpx
import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel.config import Project
from flywheel.data import features as feats
from flywheel.data.sources import infer_sql_types, upsert_table, write_table
from flywheel.demo.examples import ExampleError, post_labels
from flywheel.demo.replay import records_of, replayed_before, send_quarter, wait_for_log
from flywheel.lifecycle.rollout import check_rollout
from flywheel.lifecycle.train import train_challenger
from flywheel.pipeline.orchestrate import orchestrate
from flywheel.pipeline.runs import EvaluateResult
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.process import ServerProcess
from flywheel.serving.tabular.runtime import LoadedModel, load_version
from flywheel.serving.tabular.shadow import CHECK_EVERY_S
from flywheel.state import rollouts
from flywheel.state.db import open_state, predictions
from flywheel.training.evaluate import HIGHER_IS_BETTER, task_metrics

SHADOW_WAIT_S = 300.0  # at most this long for the shadow process to score a chunk's records
CHUNK = 2_000  # records sent at once before the replay waits for the log (and a shadow) to catch up
CHECKS_PER_PERIOD = 10  # ... and at least this many chunks a month, each followed by a rollout check


@dataclass
class PeriodResult:
    period: str  # the month, e.g. 2013-04
    rows: int
    served: int
    served_by: list[int]  # the versions the log says answered the month
    metric: float | None  # the loop: what served the month, on its rows
    every_period: float | None  # the version retrained at the previous month's end, on its rows
    retrained: int | None = None  # the version the month's end retrain registered
    outcome: str = ""  # promoted | rollout started | not promoted | failed: ...
    gate: str = ""
    rollout: dict[str, Any] | None = None  # the rollout check at the month's end


@dataclass
class PeriodPromotion:
    period: str  # promoted at this month's end
    version: int
    previous: int
    via: str  # gate | rollout
    next_new: float | None = None  # on the next month's rows
    next_previous: float | None = None
    lost: bool | None = None


@dataclass
class PeriodReplay:
    project: str
    task: str
    metric: str
    policy: str
    periods: list[PeriodResult] = field(default_factory=list)
    promotions: list[PeriodPromotion] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        loop = [p.metric for p in self.periods if p.metric is not None]
        both = [p for p in self.periods if p.metric is not None and p.every_period is not None]
        return {"policy": self.policy, "metric": self.metric, "periods": len(self.periods),
                "mean": float(np.mean(loop)) if loop else None,
                # the loop against retraining every period, on the same periods (from the second)
                "mean_compared": float(np.mean([p.metric for p in both])) if both else None,
                "mean_retrain_every_period": float(np.mean([p.every_period for p in both])) if both else None,
                "periods_compared": len(both),
                "retrains": sum(p.retrained is not None for p in self.periods),
                "promotions": len(self.promotions),
                "promotions_lost": sum(bool(p.lost) for p in self.promotions),
                "rollouts": sum(p.outcome == "rollout started" for p in self.periods)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def months(first: date, n: int) -> list[tuple[date, date]]:
    out, start = [], date(first.year, first.month, 1)
    for _ in range(n):
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        out.append((start, end))
        start = end
    return out


def truth(project: Project, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The rows' labels as the metrics take them, and which rows have one."""
    target = project.config.data.target
    values = rows[getattr(target, "column", "")]
    known = values.notna().to_numpy()
    if target.task == "regression":
        return values.to_numpy(dtype=np.float64), known
    if target.task == "multiclass":
        index = {c: i for i, c in enumerate(getattr(target, "classes", None) or [])}
        labelled = known & values.astype(str).isin(index).to_numpy()
        return np.array([index.get(str(v), -1) for v in values]), labelled
    return (values == getattr(target, "positive", 1)).to_numpy(dtype=np.int64), known


def replay_periods(project: Project, frame: pd.DataFrame, n_periods: int,  # long: one walk, in order
                   say: Callable[[str], None] = print) -> PeriodReplay:
    """See the module's docstring: `n_periods` months from `data.window.end`."""
    used = replayed_before(project)
    if used:
        raise ExampleError(f"{used}: the periods replay starts from an empty project")
    data = project.config.data
    times = pd.to_datetime(frame[data.time_column])
    first = pd.Timestamp(data.window.end)
    history = frame[times < first]
    if history.empty:
        raise ExampleError(f"no rows before data.window.end ({data.window.end}) to train on")
    started = time.perf_counter()
    write_table(history, project.source_url, data.table, infer_sql_types(history),
                index_columns=(data.time_column,))
    v1 = train_challenger(project)
    say(f"history {len(history):,} rows: v{v1.version}, {project.config.gate.metric} "
        f"{v1.metrics.get(project.config.gate.metric, float('nan')):.4g}")
    out = PeriodReplay(project.config.project, project.config.task, project.config.gate.metric,
                       project.config.rollout.mode)
    walk = _Walk(project, frame, times, Registry.for_project(project), open_state(project.state_url))
    server = ServerProcess(project, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.5"})
    try:
        server.wait_ready()
        with httpx.Client(timeout=120) as client:
            for start, end in months(first.date(), n_periods):
                result = walk.period(server, client, start, end)
                if result is None:
                    break
                out.periods.append(result)
                say(f"{result.period}: {result.served:,} served by v{result.served_by}, "
                    f"{out.metric} {_g(result.metric)}; rollout: "
                    f"{(result.rollout or {}).get('decision', '-')}; retrain v{result.retrained}: "
                    f"{result.outcome}")
    finally:
        server.stop()
    walk.score_after(out)
    out.promotions = walk.promotions
    out.seconds = time.perf_counter() - started
    return out


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class _Walk:
    """The replay's state as it walks the months."""

    def __init__(self, project: Project, frame: pd.DataFrame, times: pd.Series, registry: Registry,
                 engine: sa.Engine):
        self.project, self.frame, self.times = project, frame, times
        self.registry, self.engine = registry, engine
        self.name = project.config.registered_model
        self.models: dict[int, LoadedModel] = {}
        self.served_total = 0
        self.shadowed: dict[int, int] = {}  # rollout id: records served while it ran
        self.trained: dict[str, int] = {}  # month: the version its end's retrain registered
        self.promotions: list[PeriodPromotion] = []

    def rows(self, start: date, end: date) -> pd.DataFrame:
        return self.frame[(self.times >= pd.Timestamp(start)) & (self.times < pd.Timestamp(end))]

    def score(self, version: int, rows: pd.DataFrame) -> float | None:
        """`version`'s gate metric on `rows` (those with a label)."""
        return self.score_parts([(rows, version)])

    def score_parts(self, parts: list[tuple[pd.DataFrame, int]]) -> float | None:
        """The gate metric of the answers as served: each part scored by the version serving it."""
        ys, outs = [], []
        for rows, version in parts:
            y, known = truth(self.project, rows)
            if known.any():
                ys.append(y[known])
                outs.append(self._predict(version, rows[known]))
        if not ys:
            return None
        classes = getattr(self.project.config.data.target, "classes", None)
        value = task_metrics(self.project.config.task, np.concatenate(ys), np.concatenate(outs),
                             classes).get(self.project.config.gate.metric)
        return None if value is None or np.isnan(value) else float(value)

    def _predict(self, version: int, rows: pd.DataFrame) -> np.ndarray:
        if version not in self.models:
            self.models[version] = load_version(self.registry, version, max_records=len(self.frame))
        data, inputs = self.project.config.data, feats.input_columns(self.project.config.features)
        return self.models[version].predict(records_of(rows, inputs, data.id_column, data.time_column))

    def period(self, server: ServerProcess, client: httpx.Client, start: date,  # long: one month, in order
               end: date) -> PeriodResult | None:
        rows = self.rows(start, end)
        if rows.empty:
            return None
        data = self.project.config.data
        records = records_of(rows, feats.input_columns(self.project.config.features), data.id_column,
                             data.time_column)
        ids: dict[str, str] = {}
        parts: list[tuple[pd.DataFrame, int]] = []  # each chunk's rows and the version serving it
        result = PeriodResult(f"{start:%Y-%m}", len(rows), 0, [], None, None)
        times = pd.to_datetime(rows[data.time_column])
        # A month's traffic arrives in seconds here, over a month in production: in chunks, each
        # logged (and, in a shadow rollout, scored on the idle CPU) and labelled before the next,
        # as a server with idle time between its requests would, and the rollout checked after
        # each on the project's clock (the time of its last row), as the daemon checks every few
        # minutes; flights' and bikeshare's labels are known within the day.
        size = min(CHUNK, -(-len(records) // CHECKS_PER_PERIOD))
        for at in range(0, len(records), size):
            chunk_ids, _ = send_quarter(client, server.url, records[at:at + size])
            ids |= chunk_ids
            self.served_total += len(chunk_ids)
            wait_for_log(self.engine, self.name, self.served_total)
            self._wait_for_shadow(len(chunk_ids))
            chunk = rows.iloc[at:at + size]
            post_labels(self.project, client, server.url, chunk, chunk_ids)
            parts += self._by_version(chunk, chunk_ids)  # who answered each record, as logged
            clock = times.iloc[min(at + size, len(rows)) - 1].to_pydatetime().replace(tzinfo=UTC)
            check = check_rollout(self.project, clock, self.registry)
            if check is not None and (check.decision != "continue" or result.rollout is None
                                      or result.rollout["decision"] == "continue"):
                result.rollout = {"rollout": check.rollout.id, "challenger": check.rollout.challenger_version,
                                  "champion": check.rollout.champion_version, "decision": check.decision,
                                  "reason": check.reason, "evidence": check.evidence.describe(),
                                  "at": clock.isoformat()}
            if check is not None and check.decision == "promote":
                self._promoted(result.period, check.rollout.challenger_version,
                               check.rollout.champion_version, "rollout", server)
        result.served, result.served_by = len(ids), sorted({v for _, v in parts})
        result.metric = self.score_parts(parts)
        upsert_table(rows, self.project.source_url, data.table, data.id_column, infer_sql_types(rows),
                     index_columns=(data.time_column,))
        before = self.registry.alias_version(CHAMPION)
        run = orchestrate(self.project, "schedule", "the month's rows and labels", end, "local")
        result.retrained = run.version
        if run.version is not None:
            self.trained[result.period] = run.version
        gate = run.result("evaluate", EvaluateResult)
        result.gate = gate.summary if gate is not None else ""
        running = rollouts.running(self.engine, self.name)
        if run.status != "succeeded":
            result.outcome = f"failed: {run.error}"
        elif run.promoted and run.version is not None:
            result.outcome = "promoted"
            self._promoted(result.period, run.version, before, "gate", server)
        elif running is not None and running.challenger_version == run.version:
            result.outcome = "rollout started"
            self.shadowed.setdefault(running.id, 0)
            time.sleep(CHECK_EVERY_S + 1)  # the servers' sinks follow it before the next traffic
        else:
            result.outcome = "not promoted"
        return result

    def _promoted(self, period: str, version: int, previous: int | None, via: str,
                  server: ServerProcess) -> None:
        server.wait_for_version(version)
        if previous is not None:
            self.promotions.append(PeriodPromotion(period, version, previous, via))

    def _wait_for_shadow(self, served: int) -> None:
        """Until the shadow process has scored what was served during the running shadow rollout
        (it runs on idle CPU: the replay waits for it rather than skip evidence)."""
        running = rollouts.running(self.engine, self.name)
        if running is None or running.mode != "shadow":
            return
        self.shadowed[running.id] = self.shadowed.get(running.id, 0) + served
        deadline = time.monotonic() + SHADOW_WAIT_S
        while rollouts.shadow_count(self.engine, running.id) < self.shadowed[running.id]:
            if time.monotonic() > deadline:
                scored = rollouts.shadow_count(self.engine, running.id)
                raise ExampleError(f"the shadow process scored {scored:,} of "
                                   f"{self.shadowed[running.id]:,} records in {SHADOW_WAIT_S:.0f} s")
            time.sleep(0.2)

    def _by_version(self, rows: pd.DataFrame, record_ids: dict[str, str]) -> list[tuple[pd.DataFrame, int]]:
        """The served rows grouped by the version the log says answered each (a canary's share, a
        swap within the chunk); rows the server refused are left out."""
        wanted = list(record_ids.values())
        with self.engine.connect() as conn:
            logged = dict(conn.execute(sa.select(predictions.c.record_id, predictions.c.model_version)
                                       .where(predictions.c.record_id.in_(wanted))).all())
        entity = rows[self.project.config.data.id_column].astype(str)
        version = entity.map(lambda e: logged.get(record_ids.get(e, ""), -1))
        return [(rows[version == v], int(v)) for v in sorted(set(version)) if v >= 0]

    def score_after(self, out: PeriodReplay) -> None:
        """Retraining every period (the version each month's end registered, on the next month) and
        each promotion against the champion it replaced, on the next month's rows."""
        by_label = {p.period: i for i, p in enumerate(out.periods)}
        for i, p in enumerate(out.periods[1:], start=1):
            version = self.trained.get(out.periods[i - 1].period)
            if version is not None:
                p.every_period = self.score(version, self._month(p.period))
        higher = HIGHER_IS_BETTER[out.metric]
        for promo in self.promotions:
            i = by_label[promo.period]
            if i + 1 >= len(out.periods):
                continue
            rows = self._month(out.periods[i + 1].period)
            new, old = self.score(promo.version, rows), self.score(promo.previous, rows)
            promo.next_new, promo.next_previous = new, old
            if new is not None and old is not None:
                promo.lost = new < old if higher else new > old

    def _month(self, label: str) -> pd.DataFrame:
        start = pd.Timestamp(label + "-01")
        return self.rows(start.date(), (start + pd.offsets.MonthBegin(1)).date())


def markdown(replays: list[PeriodReplay]) -> str:
    """The policies side by side, then each month and each promotion of each."""
    lines = [f"# {replays[0].project}: the rollout policies, month by month", "",
             f"| policy | months | mean {replays[0].metric}: the loop | the loop, from the second month "
             "| retraining every month, from the second month | retrains | promotions | promotions that "
             "lost | rollouts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in replays:
        s = r.summary()
        lines.append(f"| {s['policy']} | {s['periods']} | {_g(s['mean'])} | {_g(s['mean_compared'])} | "
                     f"{_g(s['mean_retrain_every_period'])} | "
                     f"{s['retrains']} | {s['promotions']} | {s['promotions_lost']} | {s['rollouts']} |")
    for r in replays:
        lines += ["", f"## {r.policy}", "", f"| month | served by | {r.metric} | retrained every month | "
                  "retrain | outcome | rollout check |", "|---|---|---|---|---|---|---|"]
        for p in r.periods:
            check = p.rollout or {}
            lines.append(f"| {p.period} | {', '.join(f'v{v}' for v in p.served_by)} | {_g(p.metric)} | "
                         f"{_g(p.every_period)} | v{p.retrained} | {p.outcome} | "
                         + (f"{check['decision']} v{check['challenger']}: {check['reason']}" if check else "")
                         + " |")
        lines += ["", "| promoted after | version | replaced | via | next month: new | replaced | lost |",
                  "|---|---|---|---|---|---|---|"]
        for pr in r.promotions:
            lost = "yes" if pr.lost else "no" if pr.lost is False else "-"
            lines.append(f"| {pr.period} | v{pr.version} | v{pr.previous} | {pr.via} | {_g(pr.next_new)} | "
                         f"{_g(pr.next_previous)} | {lost} |")
    return "\n".join(lines) + "\n"
