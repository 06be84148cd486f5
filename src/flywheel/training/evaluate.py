"""Holdout metrics, the calibration plot, and the promotion gate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from flywheel.config import GateConfig, LlmGateConfig
from flywheel.training.model import TrainingData

HIGHER_IS_BETTER = {"roc_auc": True, "pr_auc": True, "log_loss": False, "brier": False,
                    "perplexity": False, "rmse": False, "mae": False, "r2": True, "mape": False,
                    "accuracy": True, "macro_f1": True, "weighted_f1": True, "macro_roc_auc": True}


def holdout_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC-AUC, PR-AUC, log loss and Brier score of probabilities `p` for labels `y`."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "positive_rate": float(np.mean(y)),
        "rows": float(len(y)),
    }


def task_metrics(task: str, y: np.ndarray, out: np.ndarray, classes: list[str] | None = None
                 ) -> dict[str, float]:
    """The holdout (or window) metrics of a model's outputs for its task: P(positive) (binary),
    values (regression) or an (n, classes) matrix of probabilities (multiclass)."""
    if task == "regression":
        return regression_metrics(y, out)
    if task == "multiclass":
        return multiclass_metrics(y, out, classes or [str(i) for i in range(out.shape[1])])
    return holdout_metrics(y, out)


def regression_metrics(y: np.ndarray, v: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, R-squared, and MAPE where no true value is zero (else NaN: it is undefined)."""
    y = np.asarray(y, dtype=np.float64)
    err = np.asarray(v, dtype=np.float64) - y
    spread = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
    return {
        "rmse": float(np.sqrt(np.mean(err ** 2))) if len(y) else float("nan"),
        "mae": float(np.mean(np.abs(err))) if len(y) else float("nan"),
        "r2": 1 - float(np.sum(err ** 2)) / spread if spread > 0 else float("nan"),
        "mape": float(np.mean(np.abs(err) / np.abs(y))) if len(y) and np.all(y != 0) else float("nan"),
        "target_mean": float(y.mean()) if len(y) else float("nan"),
        "rows": float(len(y)),
    }


def multiclass_metrics(y: np.ndarray, P: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Log loss, accuracy, macro and weighted F1, and one-vs-rest ROC-AUC per class (undefined for
    a class the rows do not hold, or hold only) with their mean over the classes where defined."""
    from sklearn.metrics import accuracy_score, f1_score

    y = np.asarray(y, dtype=np.int64)
    P = np.clip(np.asarray(P, dtype=np.float64), 1e-7, 1.0)
    P = P / P.sum(axis=1, keepdims=True)
    k = len(classes)
    predicted = P.argmax(axis=1)
    out = {
        "log_loss": float(log_loss(y, P, labels=list(range(k)))) if len(y) else float("nan"),
        "accuracy": float(accuracy_score(y, predicted)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, predicted, labels=list(range(k)), average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, predicted, labels=list(range(k)), average="weighted",
                                      zero_division=0)),
    }
    aucs = {}
    for i, name in enumerate(classes):
        hit = y == i
        aucs[f"roc_auc_{metric_safe(name)}"] = (float(roc_auc_score(hit, P[:, i]))
                                                if 0 < hit.sum() < len(y) else float("nan"))
    defined = [v for v in aucs.values() if not np.isnan(v)]
    out["macro_roc_auc"] = float(np.mean(defined)) if defined else float("nan")
    return {**out, **aucs, "rows": float(len(y))}


def metric_safe(name: str) -> str:
    """A class name as part of an MLflow metric key (letters, digits, _ - . only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)[:100]


def curve_metrics(data: TrainingData, y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """The per-iteration metrics of a training curve, by task; the first one decides early
    stopping (higher is better for auc, lower for the others)."""
    if data.task == "regression":
        err = np.asarray(out, dtype=np.float64) - y
        return {"rmse": float(np.sqrt(np.mean(err ** 2))), "l1": float(np.mean(np.abs(err)))}
    if data.task == "multiclass":
        k = len(data.classes)
        P = np.clip(out, 1e-7, 1.0)
        return {"logloss": float(log_loss(y, P / P.sum(axis=1, keepdims=True), labels=list(range(k)))),
                "error": float(np.mean(np.argmax(out, axis=1) != y))}
    p = np.clip(out, 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
            "logloss": float(log_loss(y, p, labels=[0, 1]))}


def calibration_plot(y: np.ndarray, p: np.ndarray, path: Path, title: str, bins: int = 10) -> Path:
    """Reliability curve over quantile bins of the score, with the score histogram below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    mean_p = np.array([p[which == b].mean() for b in np.unique(which)])
    rate = np.array([y[which == b].mean() for b in np.unique(which)])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=[3, 1], sharex=False)
    hi = max(float(mean_p.max()), float(rate.max()), 1e-3) * 1.1
    top.plot([0, hi], [0, hi], "--", color="grey", label="perfectly calibrated")
    top.plot(mean_p, rate, "o-", color="tab:blue", label="model (quantile bins)")
    top.set(xlim=(0, hi), ylim=(0, hi), xlabel="mean predicted probability",
            ylabel="observed positive rate", title=title)
    top.legend(loc="upper left")
    bottom.hist(p, bins=50, color="tab:blue", alpha=0.7)
    bottom.set(xlabel="predicted probability", ylabel="rows", yscale="log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def holdout_plot(task: str, y: np.ndarray, out: np.ndarray, folder: Path, kind: str,
                 metrics: dict[str, float], classes: list[str] | None = None) -> Path:
    """The picture of a model on its holdout: the calibration curve (binary), predicted against
    true values with the residuals (regression), the confusion matrix (multiclass)."""
    if task == "regression":
        return regression_plot(y, out, folder / "predicted_vs_true.png",
                               f"{kind} on the holdout (RMSE {metrics['rmse']:.3g}, R² {metrics['r2']:.3f})")
    if task == "multiclass":
        return confusion_plot(y, out, classes or [], folder / "confusion_matrix.png",
                              f"{kind} on the holdout (accuracy {metrics['accuracy']:.3f}, "
                              f"macro F1 {metrics['macro_f1']:.3f})")
    return calibration_plot(y, out, folder / "calibration.png",
                            f"{kind} on the holdout (ROC-AUC {metrics['roc_auc']:.3f})")


def regression_plot(y: np.ndarray, v: np.ndarray, path: Path, title: str) -> Path:
    """Predicted against true values (hexagonal bins, log counts) and the residuals' histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=[3, 1])
    low, high = np.quantile(np.concatenate([y, v]), [0.001, 0.999]) if len(y) else (0.0, 1.0)
    top.hexbin(y, v, gridsize=50, bins="log", extent=(low, high, low, high), cmap="Blues")
    top.plot([low, high], [low, high], "--", color="grey", label="perfect")
    top.set(xlabel="true value", ylabel="predicted value", title=title)
    top.legend(loc="upper left")
    bottom.hist(v - y, bins=60, range=tuple(np.quantile(v - y, [0.005, 0.995])) if len(y) else None,
                color="tab:blue", alpha=0.7)
    bottom.set(xlabel="residual (predicted - true)", ylabel="rows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_plot(y: np.ndarray, P: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """The confusion matrix, each true class's row as shares, with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (np.asarray(y, dtype=np.int64), np.asarray(P).argmax(axis=1)), 1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.0 * k + 2.5))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{shares[i, j]:.0%}\n{counts[i, j]:,}", ha="center", va="center",
                    fontsize=8, color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class GateDecision:
    """Whether the challenger may become champion, with one line per rule checked."""

    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ("PASS: " if self.passed else "FAIL: ") + "; ".join(self.reasons)


def decide_gate(
    gate: GateConfig | LlmGateConfig,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    challenger_inputs: dict[str, str],
    champion_inputs: dict[str, str] | None,
) -> GateDecision:
    """Apply the floor, the minimum improvement over the champion, and schema compatibility."""
    metric = gate.metric
    higher = HIGHER_IS_BETTER[metric]
    value = challenger[metric]
    reasons: list[str] = []
    ok = True
    if np.isnan(value):
        return GateDecision(False, [f"{metric} is undefined on the holdout (one class only, or a "
                                    "true value of zero for mape)"])
    floor_ok = value >= gate.floor if higher else value <= gate.floor
    sign = ">=" if higher else "<="
    champ_value = champion[metric] if champion is not None else None
    champ_below = champ_value is not None and not (champ_value >= gate.floor if higher
                                                   else champ_value <= gate.floor)
    if not floor_ok and champ_below:
        # The floor keeps an acceptable champion from being replaced by an unacceptable model. When
        # the champion itself is below it on today's holdout, refusing a better challenger would keep
        # the worse model serving: the improvement rule decides instead.
        reasons.append(f"floor: {metric} {value:.4f} below {gate.floor}, but the champion is too "
                       f"({champ_value:.4f}): waived, the improvement rule decides")
        floor_ok = True
    else:
        reasons.append(f"floor: {metric} {value:.4f} {sign} {gate.floor} {'holds' if floor_ok else 'FAILS'}")
    ok &= floor_ok
    if champion is None:
        reasons.append("no champion yet: only the floor applies")
        return GateDecision(bool(ok), reasons)
    gain = value - champion[metric] if higher else champion[metric] - value
    gain_ok = gain >= gate.min_improvement
    reasons.append(
        f"improvement: {metric} {value:.4f} vs champion {champion[metric]:.4f} on the same holdout, "
        f"gain {gain:+.4f} {'>=' if gain_ok else '<'} {gate.min_improvement} "
        f"{'holds' if gain_ok else 'FAILS'}"
    )
    ok &= gain_ok
    if gate.require_schema_compatible and champion_inputs is not None:
        problems = schema_incompatibilities(challenger_inputs, champion_inputs)
        reasons.append("schema: compatible with the champion's inputs" if not problems
                       else "schema FAILS: " + "; ".join(problems))
        ok &= not problems
    return GateDecision(bool(ok), reasons)


def schema_incompatibilities(challenger: dict[str, str], champion: dict[str, str]) -> list[str]:
    """What a client of the champion would break on: fields it does not send, or types changed."""
    problems = []
    for name, kind in challenger.items():
        if name not in champion:
            problems.append(f"new required input '{name}' that the champion's clients do not send")
        elif champion[name] != kind:
            problems.append(f"input '{name}' changes type from {champion[name]} to {kind}")
    return problems


def roc_pr_plot(y: np.ndarray, p: np.ndarray, path: Path, title: str) -> Path:
    """The ROC curve and the precision-recall curve of a binary model on its holdout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        left.plot(fpr, tpr, color="tab:blue", label=f"model (ROC-AUC {roc_auc_score(y, p):.3f})")
        precision, recall, _ = precision_recall_curve(y, p)
        right.plot(recall, precision, color="tab:blue",
                   label=f"model (PR-AUC {average_precision_score(y, p):.3f})")
    left.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    left.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    right.axhline(float(np.mean(y)) if len(y) else 0.0, ls="--", color="grey", label="positive rate")
    right.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in (left, right):
        ax.legend(loc="lower right" if ax is left else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


IMPORTANCE_METRIC = {"binary": "roc_auc", "regression": "rmse", "multiclass": "accuracy"}


def permutation_importance(predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray, y: np.ndarray,
                           task: str, names: list[str], classes: list[str] | None = None,
                           rows: int = 2000, seed: int = 0) -> dict[str, float]:
    """How much the task's metric worsens on (a sample of) the holdout when one feature's values
    are shuffled, per feature: model-agnostic, computed on the exported model's own answers."""
    rng = np.random.default_rng(seed)
    if len(X) > rows:
        pick = rng.choice(len(X), rows, replace=False)
        X, y = X[pick], y[pick]
    metric = IMPORTANCE_METRIC[task]
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    base = task_metrics(task, y, predict(X), classes)[metric]
    out = {}
    for j, name in enumerate(names):
        shuffled = X.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        value = task_metrics(task, y, predict(shuffled), classes)[metric]
        out[name] = float(sign * (base - value)) if np.isfinite(value) and np.isfinite(base) else 0.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def importance_plot(importance: dict[str, float], metric: str, path: Path, top: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(importance.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.4))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set(xlabel=f"{metric} lost when the feature is shuffled", title="permutation importance (holdout)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
