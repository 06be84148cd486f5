"""Synthetic reference/current frames with known shifts, shared by the drift tests and benchmark."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

os.environ.setdefault("DO_NOT_TRACK", "1")

SHIFTED = {"num_00": ("mean", 0.3), "num_03": ("scale", 1.5), "num_07": ("mean", 0.15),
           "low_01": ("shares", None), "cat_02": ("shares", None), "cat_04": ("new", None)}


def make_frame(rows: int, seed: int, shifted: bool) -> pd.DataFrame:
    """20 columns: 12 continuous, 3 numeric with 4 values, 5 categorical; SHIFTED move if asked."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for i in range(12):
        name = f"num_{i:02d}"
        kind = i % 3
        x = (rng.normal(10 + i, 2 + i / 4, rows) if kind == 0 else
             rng.lognormal(1 + i / 10, 0.6, rows) if kind == 1 else rng.gamma(2 + i / 5, 3, rows))
        if shifted and name in SHIFTED:
            how, amount = SHIFTED[name]
            assert amount is not None
            x = x + amount * float(np.std(x)) if how == "mean" else (x - x.mean()) * amount + x.mean()
        cols[name] = x
    for i in range(3):
        name = f"low_{i:02d}"
        p = np.array([0.3, 0.3, 0.25, 0.15]) if shifted and name in SHIFTED else \
            np.array([0.5, 0.3, 0.15, 0.05])
        cols[name] = rng.choice(4, size=rows, p=p).astype(np.float64)
    for i in range(5):
        name = f"cat_{i:02d}"
        k = 8 + 4 * i
        p = np.random.default_rng(100 + i).dirichlet(np.ones(k) * 2)  # the same shares on both sides
        values = np.array([f"c{j}" for j in range(k)] + ["new"])
        how = SHIFTED.get(name, ("", None))[0] if shifted else ""
        if how == "shares":
            p = np.roll(p, 1)
        probs = np.append(p * 0.7, 0.3) if how == "new" else np.append(p, 0.0)
        cols[name] = values[rng.choice(k + 1, size=rows, p=probs / probs.sum())]
    return pd.DataFrame(cols)


def evidently_scores(ref: pd.DataFrame, cur: pd.DataFrame, cats: list[str]) -> dict[str, float]:
    """Evidently DataDriftPreset's per-column drift scores (a column drifts at >= 0.1)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=[c for c in ref.columns if c not in cats],
                                categorical_columns=cats)
    snap = Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=definition),
                                          Dataset.from_pandas(ref, data_definition=definition))
    out: dict[str, float] = {}
    for metric in snap.dict()["metrics"]:
        name = metric.get("metric_name", "")
        if name.startswith("ValueDrift(column="):
            out[name.split("column=")[1].split(",")[0].rstrip(")")] = float(metric["value"])
    return out
