"""Shadow and canary rollouts: the step between a gate that passed and the promotion, decided by
evidence.

With `rollout.mode: shadow`, a challenger that passes the gate is not promoted at once: a rollout
starts (a row in the state database; the pipeline run ends there). Beside the log sink of every
server worker, a shadow process at idle CPU priority scores the challenger on the records the
champion answered (off the answered request's path; the challenger's answers are never returned and
are stored apart, in `shadow_predictions`, so no reader of the prediction log counts them). Each
check of the daemon (`flywheel run`, and each tick of a replay) pairs the two versions' answers on
the records whose labels came back and runs a sequential test on the per-record loss differences
(log loss for classifiers, squared error for a regression): an always-valid confidence sequence for
their mean, at the declared false-promotion rate. The challenger is promoted when the whole
sequence lies above zero (it is better), the rollout is aborted when it lies below (worse) or when
`max_days` pass on the project's clock without a decision; the champion stays then. A manual
promote or rollback ends a running rollout and wins; a new challenger replaces the running one
(aborted, recorded).

With `rollout.mode: canary` the challenger answers a share of the traffic instead (the workers
route by a hash of each record's entity: `flywheel.serving.tabular.canary`), and the test runs on
both versions' labelled answers, each loss weighted by one over the chance its version had to
answer it (`canary_evidence`). Configured `segments` are guard rails for both: a group whose own
confidence sequence says the challenger is worse there aborts the rollout; so do a challenger that
cannot be loaded, one that fails too often, and a canary that answers too slowly (`guard_rails`).

The confidence sequence is the asymptotic one of Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas
("Time-uniform central limit theory and asymptotic confidence sequences", 2021): for the mean of
t differences with sample standard deviation s, mean ± s * sqrt(2(t r^2 + 1) / (t^2 r^2) *
log(sqrt(t r^2 + 1) / alpha)), which holds at every t at once with probability 1 - alpha, so it may
be looked at after every batch of labels without inflating the error; r is tuned to be tightest
near `RHO_PAIRS` pairs. ROC-AUC is not a mean over records and is reported beside, not tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa

from flywheel.config import Project, RolloutConfig, SegmentConfig
from flywheel.core.errors import AliasConflict
from flywheel.lifecycle.aliases import PromotionOutcome, move_alias, promote_if_passed
from flywheel.monitoring.estimation import Calibration, EstimationSettings, estimate
from flywheel.monitoring.monitor import calibration_of
from flywheel.registry import CHAMPION, Registry
from flywheel.state import rollouts as records
from flywheel.state.db import open_state
from flywheel.state.logread import read_log
from flywheel.state.rollouts import ABORTED, PROMOTED, Rollout
from flywheel.state.traffic import traffic_series

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] for log loss, as the gate does
RHO_PAIRS = 1_000  # the confidence sequence is tightest near this many pairs
GUARD_MIN_ANSWERS = 100  # the error and latency guard rails judge no fewer answers of a version


@dataclass(frozen=True)
class Evidence:
    """What the test has seen: per-record loss differences (champion − challenger: above zero, the
    challenger is better; a canary's are weighted answers, see `canary_evidence`) and their
    confidence sequence."""

    pairs: int
    loss: str
    champion_loss: float | None
    challenger_loss: float | None
    difference: float | None
    low: float | None
    high: float | None
    false_promotion_rate: float
    differ_share: float | None  # the share of records the two versions answered differently
    champion_auc: float | None = None
    challenger_auc: float | None = None
    # before the labels: each version's gate metric estimated (CBPE) on every record both answered
    estimated: dict[str, Any] | None = None
    # per configured segment and group: pairs, mean difference, its bounds when tested
    segments: list[dict[str, Any]] = field(default_factory=list)
    # the guard rails' view of the challenger as served (see `guard_rails`): what it was asked (a
    # shadow's records to score, a canary's requests), the share it failed on, the champion's share
    # (canary), each version's p99 latency in ms (canary), the latest failure's message
    operation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> str:
        e = self.estimated or {}
        before = (f"; estimated {e['metric']} on {e['rows']:,} answers: champion "
                  f"{_g(e['champion'])}, challenger {_g(e['challenger'])}" if e.get("rows") else "")
        if not self.pairs or self.difference is None:
            return "no labelled pairs yet" + before
        return (f"{self.pairs:,} labelled pairs: {self.loss} champion {self.champion_loss:.4g}, "
                f"challenger {self.challenger_loss:.4g}; difference {self.difference:+.4g} "
                f"[{_g(self.low)}, {_g(self.high)}] at a {self.false_promotion_rate:.0%} "
                "false-promotion rate" + before)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def confidence_sequence(d: np.ndarray, alpha: float, rho_pairs: int = RHO_PAIRS) -> tuple[float, float]:
    """An asymptotic confidence sequence for the mean of `d` (valid at every sample size at once,
    at level 1 - alpha); (-inf, inf) for fewer than two values."""
    t = len(d)
    if t < 2:
        return -math.inf, math.inf
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / rho_pairs
    radius = sd * math.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1) / alpha))
    return mean - radius, mean + radius


def usable(task: str, row: dict[str, Any]) -> bool:
    """Whether a labelled pair has what its loss needs (a label of the task, both answers)."""
    if task == "regression":
        return row["y_value"] is not None and row["c_value"] is not None and row["s_value"] is not None
    if task == "multiclass":
        return row["y_text"] is not None and bool(row["c_scores"]) and bool(row["s_scores"])
    return row["y"] is not None and row["c_probability"] is not None and row["s_probability"] is not None


def paired_losses(task: str, rows: list[dict[str, Any]]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(loss name, champion's per-record losses, challenger's, whether the answers differ) for the
    usable labelled pairs `rows` (see `usable` and `flywheel.state.rollouts.paired`)."""
    if task == "regression":
        y = np.array([r["y_value"] for r in rows], dtype=np.float64)
        c = np.array([r["c_value"] for r in rows], dtype=np.float64)
        s = np.array([r["s_value"] for r in rows], dtype=np.float64)
        return "squared error", (y - c) ** 2, (y - s) ** 2, np.abs(c - s) > 1e-9 * (1 + np.abs(c))
    if task == "multiclass":
        c = np.array([json.loads(r["c_scores"]).get(r["y_text"], 0.0) for r in rows], dtype=np.float64)
        s = np.array([json.loads(r["s_scores"]).get(r["y_text"], 0.0) for r in rows], dtype=np.float64)
        differ = np.array([r["c_label"] != r["s_label"] for r in rows], dtype=bool)
        return ("log loss", -np.log(np.clip(c, EPS, 1.0)), -np.log(np.clip(s, EPS, 1.0)), differ)
    y = np.array([r["y"] for r in rows], dtype=np.float64)
    c = np.clip(np.array([r["c_probability"] for r in rows], dtype=np.float64), EPS, 1 - EPS)
    s = np.clip(np.array([r["s_probability"] for r in rows], dtype=np.float64), EPS, 1 - EPS)
    loss = lambda q: -(y * np.log(q) + (1 - y) * np.log(1 - q))  # noqa: E731
    return "log loss", loss(c), loss(s), (c >= 0.5) != (s >= 0.5)


def evidence(task: str, rows: list[dict[str, Any]], alpha: float,
             groups: dict[str, list[str | None]] | None = None, min_group_pairs: int = 200) -> Evidence:
    """The paired test on the usable rows; `groups`: per segment, each row's group (on `rows`'
    positions), whose groups with at least `min_group_pairs` pairs are tested too, each at
    alpha / (groups tested) (Bonferroni)."""
    keep = [i for i, r in enumerate(rows) if usable(task, r)]
    rows = [rows[i] for i in keep]
    name, champion, challenger, differ = paired_losses(task, rows)
    n = len(champion)
    if n == 0:
        return Evidence(0, name, None, None, None, None, None, alpha, None)
    d = champion - challenger
    low, high = confidence_sequence(d, alpha)
    aucs: tuple[float | None, float | None] = (None, None)
    if task == "binary":
        y = np.array([r["y"] for r in rows])
        if 0 < y.sum() < len(y):
            from sklearn.metrics import roc_auc_score

            aucs = (float(roc_auc_score(y, [r["c_probability"] for r in rows])),
                    float(roc_auc_score(y, [r["s_probability"] for r in rows])))
    found = segment_evidence({k: [v[i] for i in keep] for k, v in (groups or {}).items()}, d, alpha,
                             min_group_pairs)
    return Evidence(n, name, float(champion.mean()), float(challenger.mean()), float(d.mean()),
                    low if math.isfinite(low) else None, high if math.isfinite(high) else None,
                    alpha, float(differ.mean()), *aucs, segments=found)


def canary_evidence(task: str, rows: list[dict[str, Any]], rollout: Rollout, alpha: float,
                    groups: dict[str, list[str | None]] | None = None,
                    min_group_pairs: int = 200) -> Evidence:
    """The canary's test: each labelled answer's loss, weighted by the inverse of the chance its
    version had to answer it (the challenger's share, or the rest), is an unbiased estimate of the
    difference (champion − challenger) of the two versions' mean losses; the confidence sequence
    runs on those. Sound because which version answers is decided by a hash of the entity (or at
    random), not by anything about the record."""
    name, keep, losses, by_challenger, d = canary_differences(task, rows, rollout)
    if not keep:
        return Evidence(0, name, None, None, None, None, None, alpha, None)
    low, high = confidence_sequence(d, alpha)
    mean = lambda x: float(x.mean()) if len(x) else None  # noqa: E731
    found = segment_evidence({k: [v[i] for i in keep] for k, v in (groups or {}).items()}, d, alpha,
                             min_group_pairs)
    return Evidence(len(d), name, mean(losses[~by_challenger]), mean(losses[by_challenger]),
                    float(d.mean()), low if math.isfinite(low) else None,
                    high if math.isfinite(high) else None, alpha, None, segments=found)


def canary_differences(task: str, rows: list[dict[str, Any]], rollout: Rollout
                       ) -> tuple[str, list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(loss name, the usable rows' positions, their losses, whether the challenger answered each,
    each one's weighted difference) of a canary's labelled answers (see `canary_evidence`)."""
    share = rollout.share or 0.0
    # each answer's fields as a shadow pair's champion side, to reuse the same loss
    as_pairs = [{"y": r["y"], "y_value": r["y_value"], "y_text": r["y_text"],
                 "c_probability": r["probability"], "c_value": r["value"], "c_scores": r["scores"],
                 "c_label": r["label"], "s_probability": r["probability"], "s_value": r["value"],
                 "s_scores": r["scores"], "s_label": r["label"]} for r in rows]
    keep = [i for i, r in enumerate(as_pairs) if usable(task, r)] if 0 < share < 1 else []
    name, losses, _, _ = paired_losses(task, [as_pairs[i] for i in keep])
    by_challenger = np.array([rows[i]["model_version"] == rollout.challenger_version for i in keep],
                             dtype=bool)
    return name, keep, losses, by_challenger, losses * np.where(by_challenger, -1.0 / share,
                                                                1.0 / (1.0 - share))


def segment_evidence(groups: dict[str, list[str | None]], d: np.ndarray, alpha: float,
                     min_pairs: int) -> list[dict[str, Any]]:
    """Per segment and group: its pairs, mean difference and (with enough pairs) its confidence
    sequence at alpha over the number of groups tested."""
    cells: list[dict[str, Any]] = []
    for segment, labels in groups.items():
        values = np.array([g if g is not None else "" for g in labels], dtype=object)
        for group in sorted({g for g in labels if g is not None}):
            part = d[values == group]
            cells.append({"segment": segment, "group": group, "pairs": len(part),
                          "difference": float(part.mean()) if len(part) else None,
                          "low": None, "high": None, "tested": len(part) >= min_pairs})
    tested = sum(c["tested"] for c in cells)
    for c in cells:
        if c["tested"]:
            segment_of: str = c["segment"]
            values = np.array([g if g is not None else "" for g in groups[segment_of]], dtype=object)
            low, high = confidence_sequence(d[values == c["group"]], alpha / tested)
            c["low"], c["high"] = low, high
    return cells


def segment_groups(engine: sa.Engine, model_name: str, segments: list[SegmentConfig],
                   rows: list[dict[str, Any]]) -> dict[str, list[str | None]]:
    """Per configured segment, the group of each paired row, from the logged inputs or meta."""
    if not segments or not rows:
        return {}
    inputs = sorted({s.column for s in segments if not s.column.startswith("meta.")})
    metas = sorted({s.column[5:] for s in segments if s.column.startswith("meta.")})
    with engine.connect() as conn:
        log = read_log(conn, model_name, ids=sorted({int(r["prediction_id"]) for r in rows}),
                       inputs=inputs, meta=metas)
    at = {int(i): k for k, i in enumerate(log.base["id"])}
    out: dict[str, list[str | None]] = {}
    for s in segments:
        if s.column.startswith("meta."):
            values = log.meta_values(s.column[5:])
        else:
            values = log.inputs[s.column].tolist() if s.column in log.inputs else [None] * len(log)
        out[s.name] = [segment_group(s, values[at[int(r["prediction_id"])]]
                                     if int(r["prediction_id"]) in at else None) for r in rows]
    return out


def segment_group(segment: SegmentConfig, value: Any) -> str | None:
    """The group a value falls in: an interval of `edges` for numbers, else the value itself."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not segment.edges:
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    edges = segment.edges
    k = int(np.searchsorted(edges, x, side="right"))
    if k == 0:
        return f"< {edges[0]:g}"
    if k == len(edges):
        return f">= {edges[-1]:g}"
    return f"[{edges[k - 1]:g}, {edges[k]:g})"


def estimated_before_labels(project: Project, registry: Registry, engine: sa.Engine,
                            rollout: Rollout) -> dict[str, Any] | None:
    """Each version's gate metric estimated from its own calibration on every record both answered
    (labels or not): what the rollout can say before the labels come. Reported beside the test,
    never decided on (an estimate cannot see a concept shift; the paired losses can). Classifiers
    only: a regression's loss models need the records' inputs."""
    task = project.config.task
    if task == "regression":
        return None
    rows = records.answered(engine, rollout)
    metric = project.config.gate.metric
    e = project.config.monitoring.estimation
    settings = EstimationSettings(e.min_rows, e.draws, e.sample_rows, e.band_sigmas)
    out: dict[str, Any] = {"metric": metric, "rows": len(rows)}
    for side, version in (("champion", rollout.champion_version), ("challenger", rollout.challenger_version)):
        out[side], out[f"{side}_note"] = None, None
        calibration, why = (calibration_of(registry, version, project.home / "cache")
                            if version is not None else (None, "no champion"))
        if not isinstance(calibration, Calibration):
            out[f"{side}_note"] = why
            continue
        key = "c" if side == "champion" else "s"
        if task == "binary":
            q = np.sort(np.array([r[f"{key}_probability"] for r in rows
                                  if r[f"{key}_probability"] is not None], dtype=np.float64))
        else:
            width = len(calibration.classes)
            q = np.array([[json.loads(r[f"{key}_scores"]).get(c, 0.0) for c in calibration.classes]
                          for r in rows if r[f"{key}_scores"]], dtype=np.float64).reshape(-1, width)
        found = estimate(task, metric, calibration.apply(q), q, settings, calibration.classes)
        out[side], out[f"{side}_note"] = found.value, found.reason
    return out


def _at(day: date | datetime) -> datetime:
    return day if isinstance(day, datetime) else datetime.combine(day, time(), UTC)


def start_rollout(project: Project, registry: Registry, challenger: int, champion: int | None,
                  reason: str, at: date | datetime) -> Rollout:
    """Start a shadow or canary rollout of `challenger` against `champion` (a running one is
    aborted). A canary's answers count once every server has had time to follow it (one reload
    interval, and a second for the database)."""
    engine = open_state(project.state_url)
    cfg = project.config
    canary = cfg.rollout.mode == "canary"
    rollout, _ = records.start(engine, registry.model_name, cfg.rollout.mode, champion, challenger,
                               _at(at), reason, cfg.rollout.canary_share if canary else None,
                               cfg.serving.reload_interval_s + 1.0 if canary else 0.0)
    return rollout


def promote_or_roll_out(project: Project, registry: Registry, version: int, passed: bool,
                        summary: str, evaluated_against: int | None, at: date | datetime
                        ) -> tuple[PromotionOutcome, Rollout | None]:
    """What a gated challenger becomes: champion at once (`rollout.mode: direct`, or no champion
    to compare with yet), or the challenger of a shadow rollout that starts now."""
    if passed and project.config.rollout.mode != "direct" and evaluated_against is not None:
        rollout = start_rollout(project, registry, version, evaluated_against,
                                f"gate passed: {summary}", at)
        return PromotionOutcome(False, f"{rollout.mode} rollout {rollout.id} started against "
                                       f"v{evaluated_against}: {summary}"), rollout
    return promote_if_passed(registry, open_state(project.state_url), version, passed, summary,
                             evaluated_against), None


@dataclass(frozen=True)
class RolloutCheck:
    rollout: Rollout
    evidence: Evidence
    decision: str  # promote | abort | continue
    reason: str

    def summary(self) -> str:
        r = self.rollout
        return (f"{r.mode} rollout of v{r.challenger_version} against v{r.champion_version}: "
                f"{self.decision} ({self.reason}); {self.evidence.describe()}")


def check_rollout(project: Project, at: date | datetime,
                  registry: Registry | None = None) -> RolloutCheck | None:
    """Advance the running rollout, if any: gather the evidence, decide, act (promote through the
    alias lock, or abort), record. None when no rollout is running."""
    engine = open_state(project.state_url)
    rollout = records.running(engine, project.config.registered_model)
    if rollout is None:
        return None
    now = _at(at)
    registry = registry or Registry.for_project(project)
    seen = gather(project, registry, engine, rollout)
    decision, reason = decide(seen, project.config.rollout,
                              (now - rollout.started_at).total_seconds() / 86_400)
    if decision == "promote":
        try:
            move_alias(registry, engine, CHAMPION, rollout.challenger_version,
                       expected=rollout.champion_version, action="promote",
                       reason=f"{rollout.mode} rollout {rollout.id}: {seen.describe()}")
        except AliasConflict as exc:
            decision, reason = "abort", f"the champion moved during the rollout ({exc})"
    if decision == "continue":
        records.save_evidence(engine, rollout.id, seen.to_dict())
    else:
        records.end(engine, rollout.id, PROMOTED if decision == "promote" else ABORTED, now,
                    reason, seen.to_dict())
    return RolloutCheck(rollout, seen, decision, reason)


def gather(project: Project, registry: Registry, engine: sa.Engine, rollout: Rollout) -> Evidence:
    """The evidence so far: a shadow's labelled pairs, or a canary's labelled answers, and how the
    challenger behaved as served."""
    cfg, name = project.config.rollout, project.config.registered_model
    if rollout.mode == "canary":
        answers = records.canary_answers(engine, rollout)
        groups = segment_groups(engine, name, project.config.segments, answers)
        seen = canary_evidence(project.config.task, answers, rollout, cfg.false_promotion_rate,
                               groups, cfg.min_segment_pairs)
        return replace(seen, operation=canary_operation(engine, rollout))
    pairs = records.paired(engine, rollout)
    groups = segment_groups(engine, name, project.config.segments, pairs)
    seen = evidence(project.config.task, pairs, cfg.false_promotion_rate, groups, cfg.min_segment_pairs)
    tried = records.shadow_count(engine, rollout.id) + rollout.failed  # records sent to score
    operation = {"answers": tried, "failure": rollout.failure,
                 "error_rate": rollout.failed / tried if tried else None}
    return replace(seen, estimated=estimated_before_labels(project, registry, engine, rollout),
                   operation=operation)


def canary_operation(engine: sa.Engine, rollout: Rollout, until: datetime | None = None) -> dict[str, Any]:
    """Each version's requests, server-error rate and p99 latency since every worker followed the
    canary (the deployment's traffic rollup, by whole minutes: a request counts for the
    challenger when it answered any of its records)."""
    since = (rollout.serving_from or rollout.started_at).replace(second=0, microsecond=0)
    until = (until or datetime.now(UTC)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    out: dict[str, Any] = {"answers": 0, "failure": rollout.failure, "error_rate": None,
                           "champion_error_rate": None, "p99_ms": None, "champion_p99_ms": None}
    if until <= since:
        return out
    for row in traffic_series(engine, rollout.model_name, since, until, until - since):
        if row["model_version"] == rollout.challenger_version:
            out.update(answers=row["requests"], error_rate=row["error_rate"], p99_ms=row["p99_ms"])
        elif row["model_version"] == rollout.champion_version:
            out.update(champion_answers=row["requests"], champion_error_rate=row["error_rate"],
                       champion_p99_ms=row["p99_ms"])
    return out


def guard_rails(seen: Evidence, cfg: RolloutConfig) -> str | None:
    """Why the challenger must not go on, whatever its losses say: it could not be loaded, it
    failed on more than `max_error_rate` of its answers (and more often than the champion), or its
    p99 latency is over `max_latency_ratio` times the champion's (a canary's, on at least
    GUARD_MIN_ANSWERS answers of each); None when none is crossed."""
    op = seen.operation
    answers, rate, failure = op.get("answers") or 0, op.get("error_rate"), op.get("failure")
    if failure and not answers and not rate:
        return f"the challenger cannot serve: {failure}"
    if rate is not None and answers >= GUARD_MIN_ANSWERS and rate > cfg.max_error_rate and \
            rate > (op.get("champion_error_rate") or 0.0):
        return (f"the challenger failed on {rate:.1%} of {answers:,} answers (max_error_rate "
                f"{cfg.max_error_rate:.1%})" + (f": {failure}" if failure else ""))
    p99, champion_p99 = op.get("p99_ms"), op.get("champion_p99_ms")
    if p99 is not None and champion_p99 and answers >= GUARD_MIN_ANSWERS and \
            (op.get("champion_answers") or 0) >= GUARD_MIN_ANSWERS and \
            p99 > cfg.max_latency_ratio * champion_p99:
        return (f"the challenger's p99 latency is {p99:.3g} ms against the champion's "
                f"{champion_p99:.3g} ms (max_latency_ratio {cfg.max_latency_ratio:g})")
    return None


def decide(seen: Evidence, cfg: RolloutConfig, days: float) -> tuple[str, str]:
    """promote, abort or continue, and why: a guard rail crossed (see `guard_rails`) or a segment
    made worse aborts; with enough pairs the
    confidence sequence above zero promotes, below aborts; past `max_days` undecided aborts."""
    decision, reason = "continue", f"{seen.pairs:,} of at least {cfg.min_pairs:,} labelled pairs"
    crossed = guard_rails(seen, cfg)
    if crossed:
        return "abort", crossed
    worse = [c for c in seen.segments if c["high"] is not None and c["high"] < 0]
    if worse:  # a guard rail: better on average must not hide a group made worse
        return "abort", "the challenger's loss is higher for " + ", ".join(
            f"{c['segment']} {c['group']} ({c['pairs']:,} pairs)" for c in worse)
    if seen.pairs >= cfg.min_pairs and seen.low is not None and seen.high is not None:
        if seen.low > 0:
            return "promote", "the challenger's loss is lower"
        if seen.high < 0:
            return "abort", "the challenger's loss is higher"
        reason = "the evidence does not decide yet"
    if days >= cfg.max_days:
        return "abort", f"undecided after {days:.0f} days (max_days {cfg.max_days:g}); the champion stays"
    return decision, reason


def abort_rollout(project: Project, reason: str = "aborted by hand",
                  at: datetime | None = None) -> Rollout | None:
    """End the running rollout without promoting; None when none was running."""
    engine = open_state(project.state_url)
    rollout = records.running(engine, project.config.registered_model)
    if rollout is None:
        return None
    records.end(engine, rollout.id, ABORTED, at or datetime.now(UTC), reason)
    return rollout


def rollout_status(project: Project) -> dict[str, Any] | None:
    """The running rollout (or the latest one) for `flywheel status --json`."""
    engine = open_state(project.state_url)
    latest = records.history(engine, project.config.registered_model, limit=1)
    if not latest:
        return None
    r = latest[0]
    return {**r.to_dict(), "shadow_answers": records.shadow_count(engine, r.id)}
