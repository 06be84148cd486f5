"""Drift verdicts on a big window: Flywheel's profile-based detector vs Evidently's DataDriftPreset.

One run, same machine, same data: a synthetic reference and current window (ROWS x 20 columns:
12 continuous, 3 low-cardinality numeric, 5 categorical); SHIFTED columns get a real shift in the
current window, the others are drawn from the same distribution. Prints both times, the ratio,
peak memory of each, and whether the verdicts agree column by column.

    .venv/bin/python benchmarks/drift_vs_evidently.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import pandas as pd

os.environ.setdefault("DO_NOT_TRACK", "1")

from flywheel.monitoring.drift import build_profile, detect_drift  # noqa: E402

SHIFTED = {"num_00": ("mean", 0.3), "num_03": ("scale", 1.5), "num_07": ("mean", 0.15),
           "low_01": ("shares", None), "cat_02": ("shares", None), "cat_04": ("new", None)}


def make_frame(rows: int, seed: int, shifted: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for i in range(12):
        name = f"num_{i:02d}"
        kind = i % 3
        x = (rng.normal(10 + i, 2 + i / 4, rows) if kind == 0 else
             rng.lognormal(1 + i / 10, 0.6, rows) if kind == 1 else rng.gamma(2 + i / 5, 3, rows))
        if shifted and name in SHIFTED:
            how, amount = SHIFTED[name]
            std = float(np.std(x))
            x = x + amount * std if how == "mean" else (x - x.mean()) * amount + x.mean()
        cols[name] = x
    for i in range(3):
        name = f"low_{i:02d}"
        p = np.array([0.5, 0.3, 0.15, 0.05])
        if shifted and name in SHIFTED:
            p = np.array([0.3, 0.3, 0.25, 0.15])
        cols[name] = rng.choice(4, size=rows, p=p).astype(np.float64)
    for i in range(5):
        name = f"cat_{i:02d}"
        k = 8 + 4 * i
        p = rng.dirichlet(np.ones(k) * 2)  # same seed-independent draw below
        p = np.random.default_rng(100 + i).dirichlet(np.ones(k) * 2)
        values = np.array([f"c{j}" for j in range(k)] + ["new"])
        if shifted and SHIFTED.get(name, ("",))[0] == "shares":
            p = np.roll(p, 1)
        probs = np.append(p, 0.0)
        if shifted and SHIFTED.get(name, ("",))[0] == "new":
            probs = np.append(p * 0.7, 0.3)
        cols[name] = values[rng.choice(k + 1, size=rows, p=probs / probs.sum())]
    return pd.DataFrame(cols)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_evidently(ref: pd.DataFrame, cur: pd.DataFrame, cats: list[str]) -> dict[str, float]:
    """Evidently's per-column drift scores (each column drifts at score >= 0.1)."""
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
            column = name.split("column=")[1].split(",")[0].rstrip(")")
            out[column] = float(metric["value"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip-evidently", action="store_true")
    args = parser.parse_args()
    ref = make_frame(args.rows, 1, shifted=False)
    cur = make_frame(args.rows, 2, shifted=True)
    cats = [c for c in ref.columns if c.startswith("cat_")]
    print(f"{args.rows:,} rows x {ref.shape[1]} columns each side; shifted: {', '.join(SHIFTED)}")

    t0 = time.perf_counter()
    profile = build_profile(ref, cats)
    t_profile = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = detect_drift(profile, cur)
    t_ours = time.perf_counter() - t0
    mem_ours = peak_mib()
    flagged = set(ours.drifted_columns)
    print(f"flywheel: reference profile {t_profile:.2f}s (once, at training), window {t_ours:.2f}s; "
          f"flagged {sorted(flagged)}; peak RSS so far {mem_ours:,.0f} MiB")
    ok = flagged == set(SHIFTED)
    if args.skip_evidently:
        return 0 if ok else 1
    t0 = time.perf_counter()
    theirs = run_evidently(ref, cur, cats)
    t_evidently = time.perf_counter() - t0
    mem_total = peak_mib()
    flagged_ev = {c for c, score in theirs.items() if score >= 0.1}
    print(f"evidently DataDriftPreset: {t_evidently:.2f}s; flagged {sorted(flagged_ev)}; "
          f"peak RSS {mem_total:,.0f} MiB")
    agree = all((c.column in flagged_ev) == c.drifted for c in ours.columns)
    print(f"ratio: {t_evidently / t_ours:.1f}x faster per window "
          f"({t_evidently / (t_ours + t_profile):.1f}x counting the profile); "
          f"verdicts agree on every column: {agree}; exactly the shifted columns flagged: {ok}")
    for c in ours.columns:
        print(f"  {c.column:8s} {c.stattest:13s} flywheel {c.score:8.4f} {'DRIFT' if c.drifted else '':5s} "
              f"evidently {theirs.get(c.column, float('nan')):8.4f} "
              f"{'DRIFT' if c.column in flagged_ev else ''}")
    return 0 if ok and agree else 1


if __name__ == "__main__":
    sys.exit(main())
