"""How the commands show their results: Rich tables and lines, from the API's result types."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from flywheel.cli.common import console, out
from flywheel.core.secrets import redact

if TYPE_CHECKING:
    from flywheel.api import DemoResult, ExampleResult
    from flywheel.config import Project
    from flywheel.demo.replay import ReplaySummary
    from flywheel.demo.sba import DemoData
    from flywheel.lifecycle.evaluation import Evaluation
    from flywheel.lifecycle.init import Proposal
    from flywheel.lifecycle.status import ProjectStatus, TrainedOn
    from flywheel.lifecycle.train import TrainResult
    from flywheel.llm.finetune import FinetuneResult
    from flywheel.monitoring.monitor import MonitorVerdict
    from flywheel.pipeline.runs import PipelineRun
    from flywheel.training.evaluate import GateDecision

# every task's holdout metrics, in the order the tables show them
MAIN_METRICS = ("roc_auc", "pr_auc", "rmse", "mae", "r2", "mape", "log_loss", "accuracy", "macro_f1",
                "weighted_f1", "macro_roc_auc", "brier")


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{int(v):,}" if float(v).is_integer() and v > 1 else f"{v:.4f}"


def gate(decision: GateDecision) -> None:
    colour = "green" if decision.passed else "yellow"
    out.print(f"[{colour}]Gate {'PASSED' if decision.passed else 'FAILED'}[/]")
    for reason in decision.reasons:
        out.print(f"  • {reason}")


def metrics_table(name: str, metrics: dict[str, float], champ_version: int | None,
                  champ: dict[str, float] | None) -> Table:
    table = Table(title="Holdout metrics")
    table.add_column("metric")
    table.add_column(f"challenger {name}", justify="right")
    if champ is not None:
        table.add_column(f"champion v{champ_version}", justify="right")
    shown = [k for k in (*MAIN_METRICS, "positive_rate", "target_mean") if k in metrics]
    shown += sorted(k for k in metrics if k.startswith("roc_auc_")) + ["rows"]
    for key in shown:
        row = [key, fmt(metrics[key])]
        if champ is not None:
            row.append(fmt(champ.get(key, float("nan"))))
        table.add_row(*row)
    return table


def evaluation(ev: Evaluation) -> None:
    out.print(metrics_table(f"v{ev.version}", ev.metrics, ev.champion_version, ev.champion_metrics))
    gate(ev.gate)


def trained(project: Project, r: TrainResult) -> None:
    snap, split = r.prepared.snapshot, r.prepared.split.describe()
    if snap is not None:
        out.print(f"Snapshot {snap.content_hash[:12]}: {snap.rows:,} labelled rows from "
                  f"{snap.window_start} to {snap.window_end} (labels known by {snap.as_of}; "
                  f"{snap.immature_dropped:,} newer rows left out, their labels not yet known).")
    out.print(f"Split by time: train {split['train_rows']:,} | validation {split['validation_rows']:,} "
              f"from {split['validation_from']} | holdout {split['holdout_rows']:,} from "
              f"{split['holdout_from']}.")
    top = sorted(r.checks.standalone_auc.items(), key=lambda kv: -kv[1])[:3]
    measure = {"r2": "R²", "macro_roc_auc": "macro ROC-AUC"}.get(r.checks.standalone_metric, "ROC-AUC")
    out.print(f"Leakage screen passed; highest standalone {measure}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in top))
    out.print(f"Trained {r.model_type} in {r.fitted.train_seconds:.1f}s "
              f"(best iteration {r.fitted.best_iteration}); ONNX vs native max |Δ| = "
              f"{r.onnx_max_abs_diff:.1e}.")
    out.print(metrics_table(f"v{r.version}", r.metrics, r.champion_version, r.champion_metrics))
    gate(r.gate)
    name = project.config.registered_model
    out.print(f"Registered {name} v{r.version} (alias challenger)"
              + (f"; champion → v{r.version}." if r.promoted else "; champion unchanged."))
    out.print("Open the MLflow UI on this store with:\n  "
              f"mlflow ui --backend-store-uri {redact(project.tracking_url)} --host 127.0.0.1 --port 5000")
    out.print(f"Serve the champion with:\n  flywheel serve --config {project.path}")


def proposal(p: Proposal) -> None:
    table = Table(title=f"{p.rows:,} rows: what each column becomes")
    for col in ("column", "type", "empty", "distinct", "role", f"standalone {p.measure} / why"):
        table.add_column(col)
    names = {f["column"]: f["name"] for f in p.features}
    for c in p.columns:
        score = p.scores.get(names.get(c.name, ""), None)
        note = f"{score:.3f}" if score is not None else c.why
        if c.role in ("numeric", "category") and c.name not in names:
            feature = re.sub(r"\W+", "_", c.name).strip("_").lower()
            note, role = f"{p.leaky.get(feature, 0):.3f}: likely leak, left out", "left out"
        else:
            role = c.role
            note = f"{p.task} task" if c.role == "target" else note
        table.add_row(c.name, c.dtype, f"{c.nulls:.0%}", f"{c.distinct:,}", role, note)
    out.print(table)


def status(st: ProjectStatus) -> None:
    if st.kind == "lora":
        lora_status(st)
        return
    table = Table(title=f"{st.model}  (--json for lineage: run, data hash, git SHA)")
    metric = st.gate_metric or "roc_auc"
    for col in ("alias", "v", "type", metric, "gate", "window", "rows"):
        table.add_column(col, no_wrap=col == "window")
    for alias, v in (("champion", st.champion), ("challenger", st.challenger)):
        if v is None:
            table.add_row(alias, "—", "", "", "", "", "")
            continue
        t = v.trained_on
        table.add_row(alias, str(v.version), v.model_type or "",
                      f"{v.metrics.get(metric, float('nan')):.4g}", v.gate or "",
                      f"{t.start}..{t.end}", _rows_text(t))
    out.print(table)
    r = st.rollout
    if r is not None:
        seen = r.get("evidence") or {}
        pairs = seen.get("pairs", 0)
        out.print(f"{r['mode']} rollout {r['id']} of v{r['challenger_version']} against "
                  f"v{r['champion_version']}: {r['status']} ({r['reason']}); "
                  f"{r['shadow_answers']:,} shadow answers, {pairs:,} labelled pairs")


def lora_status(st: ProjectStatus) -> None:
    table = Table(title=f"{st.model}  (LoRA; --json for lineage: run, text hash, base, git SHA)")
    for col in ("alias", "v", "perplexity before", "perplexity after", "gate", "s/step"):
        table.add_column(col)
    for alias, v in (("champion", st.champion), ("challenger", st.challenger)):
        if v is None:
            table.add_row(alias, "—", "", "", "", "")
            continue
        m = v.metrics
        table.add_row(alias, str(v.version), fmt(m.get("perplexity_before")), fmt(m.get("perplexity_after")),
                      v.gate or "", fmt(m.get("seconds_per_step")))
    out.print(table)


def _rows_text(trained_on: TrainedOn) -> str:
    if not trained_on.rows:
        return ""
    fed = trained_on.feedback_rows
    return f"{trained_on.rows:,}" + (f" ({fed:,} from feedback)" if fed else "")


def verdict(v: MonitorVerdict) -> None:
    when = (f" with event time in [{v.window_start:%Y-%m-%d}, {v.window_end:%Y-%m-%d})"
            if v.window_kind == "event" and v.window_start and v.window_end else "")
    table = Table(title=f"Drift of {v.drift.rows:,} predictions{when} vs the training reference of "
                        f"v{v.model_version}")
    for col in ("feature", "test", "score", "threshold", "drift", "unseen"):
        table.add_column(col)
    for c in v.drift.columns:
        table.add_row(c.column, c.stattest, f"{c.score:.4f}", f"{c.threshold:g}",
                      "[red]DRIFT[/]" if c.drifted else "",
                      f"{v.unseen[c.column]:,}" if c.column in v.unseen else "")
    out.print(table)
    out.print(v.summary() + f" ({v.seconds:.2f}s)")
    if v.report_path:
        out.print(f"Evidently report: {v.report_path} (MLflow run {v.mlflow_run_id})")


def pipeline_run(run: PipelineRun) -> None:
    from flywheel.pipeline import runs  # the result types: no pandas behind them

    out.print(f"Pipeline run {run.id}: {run.status} (trigger {run.trigger}: {run.reason})")
    extract = run.result("extract", runs.ExtractResult)
    if extract is not None:
        out.print(f"  {'extract':9s} {extract.rows:,} rows {extract.window_start}..{extract.window_end}"
                  + ("" if extract.rows_from == "source" else f" ({extract.feedback_rows:,} from feedback)"))
    features = run.result("features", runs.FeaturesResult)
    if features is not None:
        out.print(f"  {'features':9s} {len(features.features)} features, checks passed")
    train = run.result("train", runs.TrainStepResult)
    if train is not None:
        out.print(f"  {'train':9s} v{train.version} " + ", ".join(
            f"{k} {train.metrics[k]:.4g}" for k in MAIN_METRICS if k in train.metrics))
    evaluate = run.result("evaluate", runs.EvaluateResult)
    if evaluate is not None:
        out.print(f"  {'evaluate':9s} {evaluate.summary}")
    promote = run.result("promote", runs.PromoteResult)
    if promote is not None:
        out.print(f"  {'promote':9s} " + ("PROMOTED: " if promote.promoted else "not promoted: ")
                  + promote.reason)
    alert = run.result("alert", runs.AlertResult)
    if alert is not None:
        out.print(f"  {'alert':9s} sent to {alert.sent_to}")
    if run.error:
        out.print(f"  [red]error:[/] {escape(redact(run.error))}")


def demo_data(data: DemoData) -> None:
    from flywheel.demo.sba import LEAKY_DROPPED

    c = data.clean  # on stderr, beside the progress: what was done to the data, not a result
    console.print(f"Cleaned {c.raw_rows:,} raw rows: kept {c.rows:,}, dropped {c.dropped_no_status:,} "
              f"without a status, fixed {c.dates_fixed_century} two-digit-year dates; dropped columns "
              f"{', '.join(LEAKY_DROPPED)}.")


def demo(project: Project, done: DemoResult) -> None:
    if done.replay is not None:
        replay(done.replay)
    elif done.replay_skipped != "not asked for":
        out.print(f"Replay skipped: {done.replay_skipped}. Its report is in {project.home / 'replay'}; "
                  "to replay again, start from a clean state: make clean-state")
    out.print(f"Demo finished in {done.seconds:.0f}s.")


def replay(r: ReplaySummary) -> None:
    table = Table(title="Mean ROC-AUC over the replayed quarters")
    for col in ("model", "mean ROC-AUC", "retrains"):
        table.add_column(col)
    table.add_row("static (FY1995-2001)", fmt(r.mean_static_auc), "0")
    table.add_row("Flywheel loop (logged predictions)", fmt(r.mean_loop_auc),
                  f"{r.loop_retrains} ({r.loop_promotions} promoted)")
    table.add_row("oracle (every quarter)", fmt(r.mean_oracle_auc), str(r.oracle_retrains))
    out.print(table)
    out.print(f"Report: {r.folder / 'report.md'} (plots beside it), figures in {r.folder / 'report.json'}")


def example(project: Project, done: ExampleResult) -> None:
    out.print("\nThe first model, trained on the history:")
    trained(project, done.walk.first)
    out.print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in done.walk.seconds.items()))


def finetuned(model: str, r: FinetuneResult) -> None:
    table = Table(title=f"{model} v{r.version}  (run {r.run_id[:8]})")
    for col in ("held-out perplexity", "before", "after", "champion"):
        table.add_column(col)
    champ = ("—" if r.champion_perplexity is None
             else f"{r.champion_perplexity:.3f} (v{r.champion_version})")
    table.add_row("lower is better", f"{r.perplexity_before:.3f}", f"{r.perplexity_after:.3f}", champ)
    if r.served is not None:
        table.add_row(f"served: llama.cpp {r.served.precision}", "", f"{r.served.perplexity:.3f} "
                      f"({r.served.cost:+.2%})", "")
    out.print(table)
    out.print(f"{r.steps} steps on {r.device}: {r.seconds_per_step:.2f} s/step, "
              f"{r.tokens_per_second:,.0f} tokens/s; {r.trainable_parameters:,} trainable of "
              f"{r.total_parameters:,} parameters; wall time {r.wall_seconds:.0f} s.")
    for g in r.generations:
        out.print(f"[bold]{g['prompt']}[/]\n  before: {g['before'].strip()[:200]!r}\n"
                  f"  after:  {g['after'].strip()[:200]!r}")
    gate(r.gate)
    out.print(f"champion → v{r.version}" if r.promoted else "champion unchanged")
