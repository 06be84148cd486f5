"""Holdout metrics, the calibration plot, and the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from flywheel.config import GateConfig, LlmGateConfig

HIGHER_IS_BETTER = {"roc_auc": True, "pr_auc": True, "log_loss": False, "brier": False,
                    "perplexity": False}


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
        return GateDecision(False, [f"{metric} is undefined on the holdout (one class only)"])
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
