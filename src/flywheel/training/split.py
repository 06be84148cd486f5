"""Splits by time only: train on the past, early-stop on a later slice, hold out the latest."""

from __future__ import annotations

from dataclasses import dataclass

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

    def describe(self) -> dict[str, str | int]:
        return {
            "train_rows": len(self.train),
            "validation_rows": len(self.validation),
            "holdout_rows": len(self.holdout),
            "validation_from": str(self.validation_from.date()),
            "holdout_from": str(self.holdout_from.date()),
        }


class SplitError(FlywheelError, ValueError):
    """The window cannot be split by time into three non-empty parts."""


def split_by_time(times: pd.Series, config: SplitConfig) -> TimeSplit:
    """Cut at time points so that rows sharing a timestamp never straddle two parts."""
    t = pd.to_datetime(times).to_numpy()
    order = np.argsort(t, kind="stable")
    ts = t[order]
    n = len(ts)
    val_cut = ts[min(int(n * (1 - config.validation_fraction - config.holdout_fraction)), n - 1)]
    hold_cut = ts[min(int(n * (1 - config.holdout_fraction)), n - 1)]
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
        raise SplitError(
            f"cannot split {n:,} rows by time into train/validation/holdout "
            f"({len(train)}/{len(validation)}/{len(holdout)}) over {distinct} distinct times (rows that "
            "share a time stay in one part): widen data.window or change split's fractions"
        )
    return TimeSplit(train, validation, holdout, pd.Timestamp(val_cut), pd.Timestamp(hold_cut))
