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
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flywheel.monitoring.drift import build_profile, detect_drift  # noqa: E402
from tests.drift_data import SHIFTED, evidently_scores, make_frame  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    theirs = evidently_scores(ref, cur, cats)
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
