"""Count MLflow artifact downloads of `flywheel train` (without and with a champion) and of one
`flywheel retrain --orchestrator local`, on the committed SBA sample.

It drives the `flywheel` command in this process and counts every call into MLflow's artifact
download functions, so it measures any Flywheel source tree on PYTHONPATH the same way:

    PYTHONPATH=/path/to/other/src .venv/bin/python scripts/count_downloads.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="flywheel-downloads-"))
    os.environ.update({"FLYWHEEL_HOME": str(folder / ".flywheel"), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "FLYWHEEL_MODEL__PARAMS": "{num_boost_round: 40}"})
    cfg = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    cfg["retraining"]["orchestrator"] = "local"
    config = folder / "flywheel.yaml"
    config.write_text(yaml.safe_dump(cfg))

    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from flywheel.cli import app

    calls: Counter[str] = Counter()

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    mlflow.artifacts.download_artifacts = counting("model", mlflow.artifacts.download_artifacts)
    MlflowClient.download_artifacts = counting("run artifact", MlflowClient.download_artifacts)

    def run(*args: str) -> dict[str, int]:
        import flywheel.registry

        # each command as in a fresh process: no registry (and no artifact cache) carried over
        getattr(flywheel.registry, "_REGISTRIES", {}).clear()
        calls.clear()
        try:
            app([*args, "--config", str(config)], standalone_mode=False)
        except SystemExit as exc:  # retrain exits 1 when the run did not succeed
            if exc.code not in (0, None):
                print(f"  ({' '.join(args)} exited {exc.code})", file=sys.stderr)
        return dict(calls)

    run("ingest", "--input", str(SAMPLE))
    for label, args in (("train, no champion yet", ("train",)),
                        ("train, with a champion", ("train",)),
                        ("retrain (local), with a champion", ("retrain", "--at", "2006-10-01"))):
        counted = run(*args)
        loads = counted.get("run artifact", 0)  # one per version load (the feature spec)
        print(f"RESULT {label:34} {loads} version loads  ({counted})")


if __name__ == "__main__":
    main()
