"""Splits by time only: train on the past, early-stop on a later slice, hold out the latest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import SplitConfig
from flywheel.core.errors import FlywheelError


@dataclass(frozen=True)
class TimeSplit:
    """Row indices of each part, ordered by time, with the time boundaries between them."""

    train: np.ndarray
    validation: np.ndarray
    holdout: np.ndarray
    validation_from: pd.Timestamp
    holdout_from: pd.Timestamp
    holdout_feedback_rows: int = 0  # rows of the holdout learnt from /v1/feedback
    feedback_left_out: int = 0  # feedback rows taken out of the holdout by the cap

    def describe(self) -> dict[str, str | int]:
        return {
            "train_rows": len(self.train),
            "validation_rows": len(self.validation),
            "holdout_rows": len(self.holdout),
            "validation_from": str(self.validation_from.date()),
            "holdout_from": str(self.holdout_from.date()),
            "holdout_feedback_rows": self.holdout_feedback_rows,
            "holdout_feedback_left_out": self.feedback_left_out,
        }

    def feedback_note(self) -> str | None:
        """What the gate's verdict says about the holdout's feedback rows (None: it has none)."""
        if not self.holdout_feedback_rows and not self.feedback_left_out:
            return None
        share = self.holdout_feedback_rows / max(1, len(self.holdout))
        note = (f"holdout: {self.holdout_feedback_rows:,} of {len(self.holdout):,} rows from "
                f"feedback ({share:.0%})")
        if self.feedback_left_out:
            note += f", {self.feedback_left_out:,} more left out over split.max_feedback_share"
        return note


def cap_feedback(split: TimeSplit, from_feedback: np.ndarray, max_share: float) -> TimeSplit:
    """The split with at most `max_share` of its holdout from feedback, when the holdout also has
    source rows (a project that learns only from feedback has nothing else to hold out). The
    feedback rows kept are spread evenly over the holdout's time order; those left out are
    used nowhere (they are later than every training row)."""
    hold = split.holdout
    mine = from_feedback[hold].astype(bool)
    n_feedback, n_source = int(mine.sum()), int((~mine).sum())
    allowed = n_feedback if n_source == 0 or max_share >= 1 else \
        min(n_feedback, int(np.floor(max_share / (1 - max_share) * n_source)))
    if allowed == n_feedback:
        return dataclasses.replace(split, holdout_feedback_rows=n_feedback)
    feedback_at = np.flatnonzero(mine)
    keep = feedback_at[np.linspace(0, len(feedback_at) - 1, allowed).round().astype(int)] if allowed else []
    kept = np.sort(np.concatenate([np.flatnonzero(~mine), np.asarray(keep, dtype=int)]))
    return dataclasses.replace(split, holdout=hold[kept], holdout_feedback_rows=allowed,
                               feedback_left_out=n_feedback - allowed)


class SplitError(FlywheelError, ValueError):
    """The window cannot be split by time into three non-empty parts."""


def _cuts(ts: np.ndarray, validation: float, holdout: float) -> tuple[Any, Any]:
    """The validation and holdout cut times of sorted times `ts` for these fractions."""
    n = len(ts)
    return (ts[min(int(n * (1 - validation - holdout)), n - 1)],
            ts[min(int(n * (1 - holdout)), n - 1)])


def _sizes(ts: np.ndarray, validation: float, holdout: float) -> tuple[int, int, int]:
    val_cut, hold_cut = _cuts(ts, validation, holdout)
    a, b = np.searchsorted(ts, val_cut, "left"), np.searchsorted(ts, hold_cut, "left")
    return int(a), int(b - a), int(len(ts) - b)


def workable_fractions(times: pd.Series, config: SplitConfig) -> tuple[float, float] | None:
    """The (validation, holdout) fractions nearest the configured ones that split these times
    into three non-empty parts (whole times per part), in steps of 0.01; None when none can
    (fewer than three distinct times)."""
    ts = np.sort(pd.to_datetime(times).to_numpy())
    if len(ts) == 0 or len(np.unique(ts)) < 3:
        return None
    steps = np.round(np.arange(0.01, 0.50, 0.01), 2)
    wanted = np.array([config.validation_fraction, config.holdout_fraction])
    best: tuple[float, tuple[float, float]] | None = None
    for v in steps:
        for h in steps:
            if min(_sizes(ts, v, h)) > 0:
                distance = float(np.abs(np.array([v, h]) - wanted).sum())
                if best is None or distance < best[0]:
                    best = (distance, (float(v), float(h)))
    return best[1] if best else None


def split_by_time(times: pd.Series, config: SplitConfig) -> TimeSplit:
    """Cut at time points so that rows sharing a timestamp never straddle two parts."""
    t = pd.to_datetime(times).to_numpy()
    order = np.argsort(t, kind="stable")
    ts = t[order]
    n = len(ts)
    val_cut, hold_cut = _cuts(ts, config.validation_fraction, config.holdout_fraction)
    train = order[ts < val_cut]
    validation = order[(ts >= val_cut) & (ts < hold_cut)]
    holdout = order[ts >= hold_cut]
    if min(len(train), len(validation), len(holdout)) == 0:
        distinct = len(np.unique(ts))
        if distinct < 3:
            raise SplitError(
                f"cannot split {n:,} rows by time: they fall on {distinct} distinct time(s), and rows "
                "that share a time always stay in one part (never split at random), so train, "
                "validation and holdout need at least three; widen data.window or use a finer "
                "time column (a date rather than a year)")
        fix = workable_fractions(times, config)
        advice = (f"set split.validation_fraction: {fix[0]} and split.holdout_fraction: {fix[1]} "
                  f"(train/validation/holdout {'/'.join(f'{x:,}' for x in _sizes(ts, *fix))} rows)"
                  if fix else "widen data.window or change split's fractions")
        raise SplitError(
            f"cannot split {n:,} rows by time into train/validation/holdout "
            f"({len(train)}/{len(validation)}/{len(holdout)}) with split.validation_fraction "
            f"{config.validation_fraction} and split.holdout_fraction {config.holdout_fraction} over "
            f"{distinct} distinct times (rows that share a time stay in one part): {advice}"
        )
    return TimeSplit(train, validation, holdout, pd.Timestamp(val_cut), pd.Timestamp(hold_cut))
