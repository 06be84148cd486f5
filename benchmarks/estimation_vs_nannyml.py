"""Performance estimation: Flywheel's estimators against NannyML 0.13 (CBPE and DLE), same windows.

One run, one machine. A reference set (what each side fits on: Flywheel's calibration and loss
models, NannyML's CBPE and DLE) and windows of 10k, 100k and 1M rows drawn from the same
population with a covariate shift that grows window by window (traffic moving towards one end of
the first feature). Each window is estimated by both sides; the table gives the mean absolute
error of each estimate against the realized metric (labels known here) and the time per window
(excluding the fit), with ratios.

- binary: a classifier whose score ranks like the truth but is miscalibrated; ROC-AUC (CBPE).
- regression: a model with the mean right and noise that grows with the first feature; RMSE and
  MAE (DLE).

NannyML cannot join Flywheel's lock (it needs lightgbm<4.6); it runs in a cached venv of its own
(`~/.cache/flywheel/nannyml-venv-0.13.1`, made on first use; `NML_DISABLE_USAGE_LOGGING=1`),
reading the same windows from Parquet files.

    .venv/bin/python benchmarks/estimation_vs_nannyml.py [--sizes 10000,100000,1000000] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from flywheel.monitoring import estimation as est  # noqa: E402

NML_VERSION = "0.13.1"
NML_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flywheel" / \
    f"nannyml-venv-{NML_VERSION}"
FEATURES = ["x0", "x1", "x2", "x3"]
REFERENCE_ROWS = 50_000

NANNYML_SIDE = r"""
import json, sys, time
import pandas as pd
import nannyml as nml

folder = sys.argv[1]
spec = json.load(open(f"{folder}/spec.json"))
out = {}
for task in ("binary", "regression"):
    reference = pd.read_parquet(f"{folder}/{task}-reference.parquet")
    if task == "binary":
        estimator = nml.CBPE(y_pred_proba="score", y_pred="y_pred", y_true="y", metrics=["roc_auc"],
                             problem_type="classification_binary", chunk_number=1)
    else:
        estimator = nml.DLE(feature_column_names=spec["features"], y_pred="value", y_true="y",
                            metrics=["rmse", "mae"], chunk_number=1)
    estimator.fit(reference)
    for name in spec["windows"]:
        window = pd.read_parquet(f"{folder}/{task}-{name}.parquet")
        started = time.perf_counter()
        result = estimator.estimate(window.drop(columns=["y"]))
        seconds = time.perf_counter() - started
        frame = result.filter(period="analysis").to_df()
        for metric in (["roc_auc"] if task == "binary" else ["rmse", "mae"]):
            out[f"{task}/{metric}/{name}"] = {
                "value": float(frame[(metric, "value")].iloc[0]), "seconds": seconds,
                "low": float(frame[(metric, "lower_confidence_boundary")].iloc[0]),
                "high": float(frame[(metric, "upper_confidence_boundary")].iloc[0])}
json.dump(out, open(f"{folder}/nannyml.json", "w"))
"""


def binary_population(n: int, rng: np.random.Generator) -> pd.DataFrame:
    X = rng.normal(size=(n, len(FEATURES)))
    logit = 1.4 * X[:, 0] + 0.6 * X[:, 1] - 0.4 * X[:, 2] - 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    score = 1 / (1 + np.exp(-(0.6 * logit + 0.4)))  # ranks like the truth, miscalibrated
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["score"], frame["y_pred"], frame["y"] = score, (score >= 0.5).astype(int), y
    return frame


def regression_population(n: int, rng: np.random.Generator) -> pd.DataFrame:
    X = rng.normal(size=(n, len(FEATURES)))
    mean = 3 * X[:, 1] + X[:, 2] - 0.5 * X[:, 3]
    y = mean + rng.normal(size=n) * (0.5 + np.abs(X[:, 0]))
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["value"], frame["y"] = mean + rng.normal(0, 0.1, n), y
    return frame


def shifted(population: pd.DataFrame, size: int, shift: float, rng: np.random.Generator) -> pd.DataFrame:
    """`size` rows resampled towards high values of x0 (binary) or of |x0| (regression)."""
    x0 = population["x0"].to_numpy()
    weight = np.exp(shift * (x0 if "score" in population else np.abs(x0)))
    take = rng.choice(len(population), size, p=weight / weight.sum())
    return population.iloc[take].reset_index(drop=True)


def nannyml_python() -> Path:
    python = NML_VENV / "bin" / "python"
    if not (NML_VENV / ".installed").is_file():
        print(f"making NannyML's venv in {NML_VENV} (once)", flush=True)
        subprocess.run(["python3", "-m", "venv", str(NML_VENV)], check=True)  # NannyML: Python < 3.13
        # statsmodels: imported by NannyML's plots at import time, not declared by its wheel
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"nannyml=={NML_VERSION}",
                        "pyarrow", "statsmodels"], check=True, timeout=1800)
        (NML_VENV / ".installed").touch()
    return python


def realized(task: str, metric: str, window: pd.DataFrame) -> float:
    if task == "binary":
        return float(roc_auc_score(window["y"], window["score"]))
    err = window["y"].to_numpy() - window["value"].to_numpy()
    return float(np.sqrt(np.mean(err ** 2)) if metric == "rmse" else np.mean(np.abs(err)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--windows", type=int, default=4, help="windows per size (shift 0 .. 1.5)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    populations = {"binary": binary_population(2_000_000, rng),
                   "regression": regression_population(2_000_000, rng)}
    reference = {task: pop.iloc[:REFERENCE_ROWS] for task, pop in populations.items()}
    pools = {task: pop.iloc[REFERENCE_ROWS:].reset_index(drop=True) for task, pop in populations.items()}
    shifts = np.linspace(0, 1.5, args.windows)
    names = [f"{size}-{i}" for size in sizes for i in range(args.windows)]
    windows = {}
    for task in populations:
        for name in names:
            size, i = (int(part) for part in name.split("-"))
            windows[(task, name)] = shifted(pools[task], size, shifts[i], rng)

    # Flywheel: fitted on the reference (untimed), then each window timed
    ref_b, ref_r = reference["binary"], reference["regression"]
    calibration = est.fit_calibration("binary", ref_b["y"].to_numpy(), ref_b["score"].to_numpy())
    loss = est.fit_loss_model(ref_r[FEATURES].to_numpy(), ref_r["y"].to_numpy(), ref_r["value"].to_numpy())
    ours: dict[str, dict[str, float]] = {}
    for name in names:
        w = windows[("binary", name)]
        started = time.perf_counter()
        q = np.sort(w["score"].to_numpy())  # as monitoring hands them over: sorted by answer
        e = est.estimate("binary", "roc_auc", calibration.apply(q), q)
        ours[f"binary/roc_auc/{name}"] = {"value": e.value, "low": e.low, "high": e.high,
                                          "seconds": time.perf_counter() - started}
        w = windows[("regression", name)]
        started = time.perf_counter()
        rows = est.loss_sample(len(w))
        absolute, squared = loss.predict(w[FEATURES].to_numpy()[rows], w["value"].to_numpy()[rows])
        both = {m: est.estimate_loss(m, absolute, squared, loss, rows=len(w)) for m in ("rmse", "mae")}
        seconds = time.perf_counter() - started
        for m, e in both.items():
            ours[f"regression/{m}/{name}"] = {"value": e.value, "low": e.low, "high": e.high,
                                              "seconds": seconds}

    with tempfile.TemporaryDirectory() as tmp:
        for task in populations:
            reference[task].to_parquet(f"{tmp}/{task}-reference.parquet")
            for name in names:
                windows[(task, name)].to_parquet(f"{tmp}/{task}-{name}.parquet")
        Path(tmp, "spec.json").write_text(json.dumps({"features": FEATURES, "windows": names}))
        done = subprocess.run([str(nannyml_python()), "-c", NANNYML_SIDE, tmp], capture_output=True,
                              text=True, env={**os.environ, "NML_DISABLE_USAGE_LOGGING": "1"})
        if done.returncode != 0:
            sys.exit(f"NannyML's side failed:\n{done.stderr[-4000:]}")
        theirs = json.loads(Path(tmp, "nannyml.json").read_text())

    print(f"\nPerformance estimation, {args.windows} windows per size (covariate shift 0 to 1.5), "
          f"reference {REFERENCE_ROWS:,} rows; NannyML {NML_VERSION} in its own venv\n")
    print("| task / metric | rows | MAE Flywheel | MAE NannyML | covered F / N | s per window F | "
          "s per window N | N / F time |")
    print("|---|---|---|---|---|---|---|---|")
    for task, metric in (("binary", "roc_auc"), ("regression", "rmse"), ("regression", "mae")):
        for size in sizes:
            keys = [f"{task}/{metric}/{size}-{i}" for i in range(args.windows)]
            truth = [realized(task, metric, windows[(task, k.split("/")[2])]) for k in keys]
            err_f = np.mean([abs(ours[k]["value"] - t) for k, t in zip(keys, truth, strict=True)])
            err_n = np.mean([abs(theirs[k]["value"] - t) for k, t in zip(keys, truth, strict=True)])
            cov_f = sum(ours[k]["low"] <= t <= ours[k]["high"] for k, t in zip(keys, truth, strict=True))
            cov_n = sum(theirs[k]["low"] <= t <= theirs[k]["high"] for k, t in zip(keys, truth, strict=True))
            t_f = float(np.median([ours[k]["seconds"] for k in keys]))
            t_n = float(np.median([theirs[k]["seconds"] for k in keys]))
            print(f"| {task} / {metric} | {size:,} | {err_f:.4f} | {err_n:.4f} | {cov_f}/{len(keys)} / "
                  f"{cov_n}/{len(keys)} | {t_f:.3f} | {t_n:.3f} | ×{t_n / t_f:.1f} |")


if __name__ == "__main__":
    main()
