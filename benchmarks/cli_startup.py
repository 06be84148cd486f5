"""How long `flywheel --help` takes, this tree against another source tree, in one run.

    .venv/bin/python benchmarks/cli_startup.py --baseline /path/to/other/src [--runs 15]

Each round starts `python -m flywheel.cli --help` once per tree, alternating, in a fresh process
(nothing cached in memory but what the OS keeps for both); the median of each is printed with
their ratio, and the heavy libraries each tree's CLI imports (`-X importtime`): none of pandas,
MLflow, PyTorch or scikit-learn should load to print the help.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("pandas", "mlflow", "torch", "sklearn", "numpy", "duckdb", "onnxruntime")


def once(src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "COLUMNS": "100"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flywheel.cli", "--help"], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - started


def heavy_imports(src: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flywheel.cli", "--help"], env=env,
                          capture_output=True, text=True, check=True)
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return sorted(m for m in HEAVY if m in loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="another Flywheel src folder")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent / "src"
    once(here), once(args.baseline)  # warm the OS's file cache for both
    ours, theirs = [], []
    for _ in range(args.runs):
        ours.append(once(here))
        theirs.append(once(args.baseline))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"flywheel --help: this tree {a * 1000:.0f} ms, baseline {b * 1000:.0f} ms (medians of "
          f"{args.runs}); this / baseline x{a / b:.3f}")
    print(f"heavy imports behind --help: this tree {heavy_imports(here) or 'none'}, "
          f"baseline {heavy_imports(args.baseline) or 'none'}")


if __name__ == "__main__":
    main()
