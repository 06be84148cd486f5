"""Prometheus metrics of the server, aggregated across worker processes.

`flywheel serve` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start;
each worker writes its samples to memory-mapped files there and /metrics sums them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flywheel.state.verdicts import latest_verdict, pipeline_summary

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Generation takes seconds to minutes on a CPU.
GENERATION_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ and \
            values.ValueClass.__name__ != "MutexValue"
        # In multiprocess mode samples go to files and are collected at scrape time; the objects
        # themselves are not registered anywhere.
        self.own_registry = None if self.multiprocess else CollectorRegistry()
        reg = self.own_registry
        self.requests = Counter("flywheel_requests_total", "HTTP requests",
                                ["endpoint", "status", "model_version"], registry=reg)
        self.latency = Histogram("flywheel_request_latency_seconds", "Request latency",
                                 ["endpoint", "status", "model_version"], buckets=buckets,
                                 registry=reg)
        self.predictions = Counter("flywheel_predictions_total", "Records scored",
                                   ["model_version"], registry=reg)
        self.swaps = Counter("flywheel_model_swaps_total", "Champion swaps", registry=reg)
        self.model_version = Gauge("flywheel_model_version", "Version served by each worker",
                                   registry=reg, multiprocess_mode="liveall")
        self.log_depth = Gauge("flywheel_prediction_log_queue_depth", "Records waiting to be logged",
                               registry=reg, multiprocess_mode="livesum")
        self.log_written = Counter("flywheel_prediction_log_written_total", "Records logged",
                                   registry=reg)
        self.log_degraded = Gauge("flywheel_prediction_log_degraded",
                                  "1 while a worker's prediction log is degraded (see /health)",
                                  registry=reg, multiprocess_mode="livemax")
        self.log_sink_restarts = Counter("flywheel_prediction_log_sink_restarts_total",
                                         "Log sinks that exited and were replaced", registry=reg)
        self.log_dropped = Counter("flywheel_prediction_log_dropped_total",
                                   "Records the prediction log could not keep", registry=reg)
        self.shadow_skipped = Counter("flywheel_shadow_skipped_total",
                                      "Log batches (frames) a shadow rollout's challenger was too far "
                                      "behind to score", registry=reg)
        self._children: dict[tuple[str, int, int], tuple[Any, Any]] = {}
        self.rollup: Any = None  # a TrafficRollup: per-minute counts for the control room

    def count_dropped(self, n: int) -> None:
        """Records the prediction log will never store (the counter and the minute's rollup)."""
        self.log_dropped.inc(n)
        if self.rollup is not None:
            self.rollup.dropped(n)

    def observe(self, endpoint: str, status: int, version: int, seconds: float) -> None:
        key = (endpoint, status, version)
        pair = self._children.get(key)
        if pair is None:  # label lookups cost more than the increment: cache the children
            labels = (endpoint, str(status), str(version))
            pair = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)
        if self.rollup is not None:
            self.rollup.observe(endpoint, status, version, seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.own_registry is not None:
            return generate_latest(self.own_registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @staticmethod
    def worker_exited(pid: int) -> None:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)


class GenerationMetrics:
    """What a text-generation server adds: tokens, generations in progress and waiting, refusals."""

    def __init__(self, base: ServingMetrics) -> None:
        from prometheus_client import Counter, Gauge

        reg = base.own_registry
        self.generated_tokens = Counter("flywheel_generated_tokens_total", "Tokens generated",
                                        ["model_version"], registry=reg)
        self.prompt_tokens = Counter("flywheel_prompt_tokens_total", "Prompt tokens read",
                                     ["model_version"], registry=reg)
        self.in_progress = Gauge("flywheel_generations_in_progress", "Generations running now",
                                 registry=reg, multiprocess_mode="livesum")
        self.waiting = Gauge("flywheel_generations_waiting", "Generations waiting for a slot",
                             registry=reg, multiprocess_mode="livesum")
        self.rejected = Counter("flywheel_generations_rejected_total",
                                "Generations refused with 429 (all slots busy, queue full)",
                                registry=reg)


_VERDICT_CACHE: dict[str, tuple[float, bytes]] = {}


def monitoring_gauges(engine: Any, model_name: str, max_age_s: float = 5.0) -> bytes:
    """The latest monitoring verdicts (state database) as Prometheus gauges, cached for a few seconds.

    Monitoring runs in another process (`flywheel monitor`, `flywheel run`); the state database is
    where its verdicts are, so every worker reads them from there at scrape time.
    """
    cached = _VERDICT_CACHE.get(model_name)
    if cached and time.monotonic() - cached[0] < max_age_s:
        return cached[1]
    try:
        verdict, runs = latest_verdict(engine, model_name), pipeline_summary(engine, model_name)
    except Exception:  # the scrape must answer even if the state database does not
        verdict, runs = None, None
    text = ("" if verdict is None else _verdict_text(verdict)) + ("" if runs is None else _runs_text(runs))
    _VERDICT_CACHE[model_name] = (time.monotonic(), text.encode())
    return text.encode()


def _label(value: Any) -> str:
    """A label value as the exposition format writes it: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _verdict_text(v: dict[str, Any]) -> str:
    version = v["model_version"]
    lines = [
        "# HELP flywheel_drift_detected 1 if the latest monitoring window drifted (dataset verdict)",
        "# TYPE flywheel_drift_detected gauge",
        f'flywheel_drift_detected{{model_version="{version}"}} {int(bool(v["drift_detected"]))}',
        "# HELP flywheel_drift_share Share of features that drifted in the latest window",
        "# TYPE flywheel_drift_share gauge",
        f'flywheel_drift_share{{model_version="{version}"}} {float(v["drift_share"])}',
        "# HELP flywheel_feature_drift_score Drift score of each feature in the latest window",
        "# TYPE flywheel_feature_drift_score gauge",
    ]
    for c in v["columns"]:
        labels = f'feature="{_label(c["column_name"])}",stattest="{_label(c["stattest"])}"'
        lines.append(f"flywheel_feature_drift_score{{{labels}}} {float(c['score'])}")
    lines += ["# HELP flywheel_feature_drifted 1 if the feature drifted in the latest window",
              "# TYPE flywheel_feature_drifted gauge"]
    lines += [f'flywheel_feature_drifted{{feature="{_label(c["column_name"])}"}} {int(bool(c["drifted"]))}'
              for c in v["columns"]]
    unseen = [c for c in v["columns"] if c.get("unseen_rows") is not None]
    if unseen:
        lines += ["# HELP flywheel_feature_unseen_rows Rows of the latest window whose category the "
                  "model never learnt", "# TYPE flywheel_feature_unseen_rows gauge"]
        lines += [f'flywheel_feature_unseen_rows{{feature="{_label(c["column_name"])}"}} '
                  f'{int(c["unseen_rows"])}' for c in unseen]
    if v.get("prediction_drift") is not None:
        lines += ["# HELP flywheel_prediction_drift_score Drift score of the predictions (probabilities, "
                  "values or class shares)",
                  "# TYPE flywheel_prediction_drift_score gauge",
                  f"flywheel_prediction_drift_score {float(v['prediction_drift'])}"]
    lines += ["# HELP flywheel_performance_drop 1 if the latest labelled window's metric dropped",
              "# TYPE flywheel_performance_drop gauge",
              f"flywheel_performance_drop {int(bool(v['performance_drop']))}"]
    for name in ("roc_auc", "pr_auc", "brier"):
        if v.get(name) is not None:
            lines += [f"# HELP flywheel_window_{name} {name} over the latest labelled predictions",
                      f"# TYPE flywheel_window_{name} gauge", f"flywheel_window_{name} {float(v[name])}"]
    if v.get("metric") is not None and v.get("metric_value") is not None:
        lines += ["# HELP flywheel_window_metric The task's metric (the gate's) over the latest labelled "
                  "predictions", "# TYPE flywheel_window_metric gauge",
                  f'flywheel_window_metric{{metric="{_label(v["metric"])}"}} {float(v["metric_value"])}']
    if v.get("estimated_metric") is not None and v.get("estimated_value") is not None:
        metric = f'metric="{_label(v["estimated_metric"])}"'
        lines += ["# HELP flywheel_window_estimated_metric The gate's metric estimated over the latest "
                  "window from its predictions alone (before labels), with its band",
                  "# TYPE flywheel_window_estimated_metric gauge"]
        lines += [f'flywheel_window_estimated_metric{{{metric},bound="{bound}"}} {float(v[key])}'
                  for bound, key in (("estimate", "estimated_value"), ("low", "estimated_low"),
                                     ("high", "estimated_high"))
                  if v.get(key) is not None]
    return "\n".join(lines) + "\n"


def _runs_text(runs: dict[str, Any]) -> str:
    """Pipeline runs by outcome (from the state database: every replica reports the same numbers)."""
    lines = ["# HELP flywheel_pipeline_runs_total Retraining pipeline runs, by status",
             "# TYPE flywheel_pipeline_runs_total counter"]
    for status in ("succeeded", "failed", "running"):
        count = int(runs["counts"].get(status, 0))
        lines.append(f'flywheel_pipeline_runs_total{{status="{status}"}} {count}')
    if runs["last_status"] is not None:
        lines += ["# HELP flywheel_pipeline_last_run_failed 1 if the newest pipeline run failed",
                  "# TYPE flywheel_pipeline_last_run_failed gauge",
                  f'flywheel_pipeline_last_run_failed{{trigger="{_label(runs["last_trigger"])}"}} '
                  f'{int(runs["last_status"] == "failed")}']
    return "\n".join(lines) + "\n"
