"""The rollout policies side by side on an example whose labels come back quickly: the same months
replayed through the loop once per policy (`--policies`, default direct,shadow; canary too), on
fresh project homes: `direct` (the gate promotes), `shadow` (the gate starts a shadow rollout; the
sequential test on the labelled pairs promotes) or `canary` (the challenger answers 10% of the
traffic; the weighted test promotes). All retrain at every month's end. See
`flywheel.demo.periods`.

The settings are the example's own config and the rollout defaults (false-promotion rate 5%,
min_pairs 200), fixed before any replayed month; only `data.window.end` moves, to leave months to
replay. The two runs share the machine one after the other, never at once (the shadow process
runs on idle CPU).

    .venv/bin/python benchmarks/rollout_policies.py --example flights --first 2013-04-01 --periods 9 \\
        --policies direct,shadow,canary --out docs/replay-policies/flights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def chart(replays: list[dict], path: Path) -> None:
    """Each policy's metric per month (a line where it promoted), and retraining every month, from
    the replays' `to_dict()` (what report.json holds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    months = [p["period"] for p in replays[0]["periods"]]
    nan = float("nan")
    ax.plot(months, [nan if p["every_period"] is None else p["every_period"] for p in replays[0]["periods"]],
            color="grey", linestyle=":", label="retraining every month (promoting every retrain)")
    for r, color in zip(replays, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        s = r["summary"]
        ax.plot(months, [nan if p["metric"] is None else p["metric"] for p in r["periods"]], color=color,
                marker="o", label=f"{r['policy']} (mean {s['mean']:.4g}; {s['promotions']} promotions, "
                                  f"{s['promotions_lost']} lost)")
        for promo in r["promotions"]:  # the promoted version serves from the next month
            i = months.index(promo["period"]) + 1
            if i < len(months):
                ax.axvline(i - 0.5, color=color, alpha=0.3, linestyle="--" if promo["lost"] else "-")
    ax.set_ylabel(f"{replays[0]['metric']} on the month's rows")
    ax.set_title(f"{replays[0]['project']}: the month's {replays[0]['metric']} under each rollout policy\n"
                 "(vertical lines: a promotion; dashed: it lost on the next month)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--example", choices=["flights", "bikeshare"], default="flights")
    parser.add_argument("--first", default=None, help="the first replayed month (data.window.end)")
    parser.add_argument("--periods", type=int, default=9)
    parser.add_argument("--policies", default="direct,shadow")
    parser.add_argument("--data", default=None, help="a Parquet file instead of the example's package")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import pandas as pd

    from flywheel.config import cache_dir, load_project
    from flywheel.demo.examples import load_dataset
    from flywheel.demo.periods import markdown, replay_periods

    frame = pd.read_parquet(args.data) if args.data else load_dataset(args.example, cache_dir())
    base = yaml.safe_load((REPO / "examples" / args.example / "flywheel.yaml").read_text())
    if args.first:
        base["data"]["window"]["end"] = args.first
    work = Path(tempfile.mkdtemp(prefix=f"flywheel-policies-{args.example}-"))
    replays = []
    for policy in args.policies.split(","):
        home = work / policy
        home.mkdir()
        config = home / "flywheel.yaml"
        config.write_text(yaml.safe_dump({**base, "rollout": {"mode": policy}}))
        os.environ["FLYWHEEL_HOME"] = str(home / ".flywheel")
        print(f"== {policy}", flush=True)
        replays.append(replay_periods(load_project(config), frame, args.periods,
                                      say=lambda m: print(f"  {m}", flush=True)))
    report = markdown(replays)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(report)
        (args.out / "report.json").write_text(json.dumps([r.to_dict() for r in replays], indent=1,
                                                         default=str))
        chart([r.to_dict() for r in replays], args.out / "metric_per_month.png")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
