"""What the per-minute traffic counts add to each served request: `ServingMetrics.observe` (the
Prometheus counter and histogram every request feeds) with and without the `TrafficRollup` behind
it, timed in a loop in one process, rounds interleaved; and that cost as a share of a request at
the rate `--rps` (one worker's requests per second in serve_vs_mlflow).

    .venv/bin/python benchmarks/metrics_observe.py [--calls 200000] [--rounds 5] [--rps 8000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import timeit
from pathlib import Path

from flywheel.serving.http.metrics import ServingMetrics
from flywheel.serving.http.traffic import TrafficRollup
from flywheel.state.db import open_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rps", type=float, default=8000.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_state(f"sqlite:///{Path(tmp) / 'state.db'}")
        plain, counted = ServingMetrics(), ServingMetrics()
        counted.rollup = TrafficRollup(engine, "model")  # not started: its writes are another thread's
        times: dict[str, list[float]] = {"without": [], "with": []}
        for k in range(args.rounds):
            for name, metrics in (("without", plain), ("with", counted))[:: 1 if k % 2 == 0 else -1]:
                seconds = timeit.timeit(lambda m=metrics: m.observe("/predict", 200, 3, 0.0012),
                                        number=args.calls)
                times[name].append(seconds / args.calls * 1e6)
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        per_request = 1e6 / args.rps
        print(f"ServingMetrics.observe, median of {args.rounds} rounds of {args.calls:,} calls:")
        print(f"  without the rollup {without:.2f} us, with it {with_:.2f} us: "
              f"+{with_ - without:.2f} us a request")
        print(f"  at {args.rps:,.0f} requests/s ({per_request:.0f} us each) that is "
              f"{(with_ - without) / per_request:.1%} of a request's time")


if __name__ == "__main__":
    main()
