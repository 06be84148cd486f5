"""The model card of a registered tabular version, from its run: Markdown and self-contained HTML.

At training, `card_facts.log_card_facts` logs what only the training process knows to the run under
`card/`: the target and feature definitions it used, the training/validation/holdout sizes, the
leakage screen's top standalone scores, the permutation importance on the holdout, and the task's
plots (ROC and precision-recall plus calibration for binary; predicted against true values with
the residuals for regression; the confusion matrix for multiclass). Once the gate has decided,
`publish_card` renders the card from those facts, the version's metrics, lineage and gate tags,
and the monitoring windows it has served so far, and logs `card/model_card.md` and
`card/model_card.html` (images inlined: one file that opens anywhere). `flywheel card` renders it
again (with the latest monitoring) and writes it to a folder; the control room links it. This
module imports no training library: the slim serving image shows cards through the room.
"""

from __future__ import annotations

import base64
import json
import tempfile
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from markdown_it import MarkdownIt

from flywheel.config import Project
from flywheel.registry import Registry, VersionInfo
from flywheel.state.db import monitor_runs, open_state

CARD_DIR = "card"
FACTS = "facts.json"


@dataclass(frozen=True)
class CardFacts:
    """What the training process logged for the card (facts.json and the plots), kept in memory
    so that the card made right after training is rendered from them, not downloaded back."""

    facts: dict[str, Any]
    images: dict[str, bytes]


@dataclass(frozen=True)
class ModelCard:
    version: int
    markdown: str  # images referenced as files beside it
    html: str  # one file, images inlined
    images: dict[str, bytes]

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "model_card.md", folder / "model_card.html"]
        paths[0].write_text(self.markdown)
        paths[1].write_text(self.html)
        for name, data in self.images.items():
            (folder / name).write_bytes(data)
            paths.append(folder / name)
        return paths


def publish_card(project: Project, registry: Registry, version: int,
                 made: CardFacts | None = None) -> ModelCard | None:
    """Render the card (from `made`, the facts just logged by this process, else from the run) and
    log it to the version's run (None: a version trained before cards)."""
    card = render_card(project, registry, version, made)
    if card is None:
        return None
    info = registry.version(version)
    with tempfile.TemporaryDirectory() as tmp:
        for path in card.write(Path(tmp))[:2]:
            registry.log_artifact(info.run_id, path, CARD_DIR)
    return card


def render_card(project: Project, registry: Registry, version: int,
                made: CardFacts | None = None) -> ModelCard | None:
    info = registry.version(version)
    if made is not None:
        facts = made.facts
        images = {n: b for n, b in made.images.items() if n in CARD_PLOTS and b.startswith(PNG_SIGNATURE)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = registry.download_run_artifacts(version, CARD_DIR, Path(tmp))
            except Exception:  # no card/ on this run: trained before model cards
                return None
            if not (folder / FACTS).is_file():
                return None
            facts = json.loads((folder / FACTS).read_text())
            images = card_images(folder, facts.get("plots", []))
    served = _served_windows(project, info.name, version)
    markdown = _markdown(project, info, facts, served)
    return ModelCard(version, markdown, render_html(markdown, images, f"{info.name} v{version}"), images)


# The only images a card shows: the plots `card_facts` draws. Their names come from the run's
# facts.json, which anyone who can write to the tracking store can change; an absolute name or
# "../" once inlined a file the server could read (its environment, the admin token) into the
# card a viewer saw. So: these names only, inside the card's folder, and PNG bytes only.
CARD_PLOTS = frozenset({"calibration.png", "confusion_matrix.png", "importance.png",
                        "predicted_vs_true.png", "roc_pr.png"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def card_images(folder: Path, names: Any) -> dict[str, bytes]:
    """The card's plots that are allowed, inside `folder`, and PNG files; anything else is left out."""
    images: dict[str, bytes] = {}
    if not isinstance(names, list):
        return images
    root = folder.resolve()
    for name in names:
        if not isinstance(name, str) or name not in CARD_PLOTS:
            continue
        path = (folder / name).resolve()
        if path.parent != root or not path.is_file():
            continue
        data = path.read_bytes()
        if data.startswith(PNG_SIGNATURE):
            images[name] = data
    return images


def _served_windows(project: Project, name: str, version: int) -> list[dict[str, Any]]:
    r = monitor_runs
    with open_state(project.state_url).connect() as conn:
        rows = conn.execute(sa.select(r.c.id, r.c.window_start, r.c.window_end, r.c.rows, r.c.drift_share,
                                      r.c.drift_detected, r.c.metric, r.c.metric_value, r.c.performance_drop,
                                      r.c.estimated_metric, r.c.estimated_value, r.c.estimated_low,
                                      r.c.estimated_high, r.c.estimate_note, r.c.concept_shift)
                            .where(r.c.model_name == name, r.c.model_version == version)
                            .order_by(r.c.id)).mappings().all()
    return [dict(x) for x in rows]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def _target_text(facts: dict[str, Any]) -> str:
    t = facts["target"]
    if t.get("kind") == "performance_window":
        return (f"binary: `{t['event_column']}` = `{t['event_value']}` within {t['months']} months of "
                f"`{facts['time_column']}` (the event's time: `{t['event_time_column']}`). A row's label "
                f"is known {t['months']} months after its `{facts['time_column']}`; training uses only "
                "labels known by `as_of`, and monitoring waits for them as long.")
    extra = f", positive = `{t.get('positive')}`" if t.get("positive") is not None else ""
    return f"{t.get('task', facts['task'])}: the column `{t.get('column')}`{extra}."


def _feature_text(f: dict[str, Any]) -> str:
    details = ", ".join(f"{k} `{v}`" for k, v in f.items() if k not in ("name", "kind") and v is not None)
    return f"| `{f.get('name')}` | {f.get('kind')} | {details} |"


def _markdown(project: Project, info: VersionInfo, facts: dict[str, Any],
              served: list[dict[str, Any]]) -> str:
    run = info.run_tags
    lines = [
        f"# {info.name} v{info.version}: model card", "",
        f"A {facts['task']} model (`{run.get('model_type', '?')}`) trained by Flywheel on the "
        f"`{facts['table']}` table, registered as version {info.version} of `{info.name}` (MLflow run "
        f"`{info.run_id}`).", "",
        "## Problem and target", "", f"Target: {_target_text(facts)}", "",
        f"Each row is one `{facts['id_column']}`, ordered by `{facts['time_column']}`.", "",
        *_lineage_lines(run, facts["sizes"]),
        "## Features", "", f"{len(facts['inputs'])} model inputs from these definitions:", "",
        "| feature | kind | definition |", "|---|---|---|",
        *[_feature_text(f) for f in facts["features"]], "",
        *_leakage_lines(facts["leakage"]),
        *_metric_lines(info, facts),
        "## Gate decision", "",
        f"**{info.tags.get('gate', 'not gated yet')}**: {info.tags.get('gate_reasons', '')}", "",
        *_monitoring_lines(served),
        "## Intended use and known limits", "", *_limits(project, facts, run),
    ]
    return "\n".join(lines) + "\n"


def _lineage_lines(run: dict[str, str], sizes: dict[str, Any]) -> list[str]:
    return [
        "## Data and lineage", "", "| | |", "|---|---|",
        f"| training window | {run.get('window_start', '?')} to {run.get('window_end', '?')} "
        f"(labels known by {run.get('as_of', '?')}) |",
        f"| rows | {run.get('rows', '?')} from {run.get('rows_from', 'source')} "
        f"({run.get('feedback_rows', 0)} from labels sent back) |",
        f"| split by time | train {sizes['train']:,}, validation {sizes['validation']:,} (from "
        f"{sizes['validation_from']}), holdout {sizes['holdout']:,} (from {sizes['holdout_from']}) |",
        f"| data snapshot sha256 | `{run.get('data_hash', '?')}` |",
        f"| code | git `{run.get('git_sha', '?')}`, config hash `{run.get('config_hash', '?')}` |", ""]


def _leakage_lines(leakage: dict[str, Any]) -> list[str]:
    accepted = f" (accepted: {', '.join(leakage['accepted'])})" if leakage["accepted"] else ""
    return ["## Leakage screen", "",
            f"Each feature's standalone {leakage['metric']} (out of sample); training stops at "
            f"{leakage['threshold']} unless the feature is accepted{accepted}.", "",
            "| feature | standalone score |", "|---|---|",
            *[f"| `{k}` | {_fmt(v)} |" for k, v in leakage["top"].items()], ""]


def _metric_lines(info: VersionInfo, facts: dict[str, Any]) -> list[str]:
    metrics = {k.removeprefix("holdout_"): v for k, v in info.metrics.items() if k.startswith("holdout_")}
    return ["## Holdout metrics", "", "| metric | value |", "|---|---|",
            *[f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())], "",
            *[f"![{name}]({name})" for name in facts.get("plots", [])
              if name in CARD_PLOTS and name != "importance.png"], "",
            "## Feature importance", "",
            f"Permutation importance on the holdout: the {facts['importance']['metric']} lost when one "
            "feature's values are shuffled.", "", "![importance](importance.png)", ""]


def _monitoring_lines(served: list[dict[str, Any]]) -> list[str]:
    if not served:
        return ["## Monitoring", "", "Not monitored yet: no monitoring window has scored this version.", ""]
    rows = [f"| {w['id']} | {str(w['window_start'] or '')[:10]} to {str(w['window_end'] or '')[:10]} | "
            f"{w['rows']:,} | {_fmt(w['drift_share'])} ({'drift' if w['drift_detected'] else 'no drift'}) | "
            f"{w['metric'] or '—'} {_fmt(w['metric_value']) if w['metric_value'] is not None else '—'}"
            f"{' (drop)' if w['performance_drop'] else ''} | {_estimated(w)} |" for w in served[-20:]]
    return ["## Monitoring", "", f"{len(served)} monitoring windows scored this version while it served "
            f"(the latest {min(len(served), 20)}). Estimated: the metric predicted from the window's "
            "answers alone, before any label, with its band; *concept shift*: once labelled, the "
            "realized value fell outside that band.", "",
            "| window | span | rows | drift share | performance | estimated |", "|---|---|---|---|---|---|",
            *rows, ""]


def _estimated(w: dict[str, Any]) -> str:
    if w.get("estimated_value") is None:
        return "—" if not w.get("estimate_note") else f"— ({w['estimate_note'][:80]})"
    band = (f" [{_fmt(w['estimated_low'])}, {_fmt(w['estimated_high'])}]"
            if w.get("estimated_low") is not None and w.get("estimated_high") is not None else "")
    return (f"{w['estimated_metric']} {_fmt(w['estimated_value'])}{band}"
            + (" (concept shift)" if w.get("concept_shift") else ""))


def _limits(project: Project, facts: dict[str, Any], run: dict[str, str]) -> list[str]:
    card = project.config.card
    use = card.intended_use or (
        f"Scoring new `{facts['table']}` rows like those of the training window, through `flywheel serve` "
        "or `flywheel predict`, with the served version's monitoring watching drift and performance.")
    limits = [
        f"- Trained on {run.get('window_start', '?')} to {run.get('window_end', '?')}: rows unlike that "
        "period (new categories, other ranges) are extrapolation; the drift monitor flags them.",
        "- Categories unseen in training, or too rare, are mapped to one 'other' value.",
        "- Metrics are on a time-ordered holdout, the latest part of the window: later periods may differ.",
        *[f"- {x}" for x in card.limitations],
    ]
    return [use, "", *limits]


def render_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """The Markdown as one HTML page, each image referenced by name inlined (no other file needed;
    raw HTML in the Markdown is shown as text, not run)."""
    inlined = markdown
    for name, data in images.items():
        inlined = inlined.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(data).decode()})")
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(inlined)
    style = ("body{font-family:system-ui,sans-serif;max-width:900px;margin:auto;padding:12px;color:#111827}"
             "table{border-collapse:collapse}td,th{border:1px solid #e5e7eb;padding:3px 8px;text-align:left}"
             "img{max-width:100%}code{font-size:.85em;word-break:break-all}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f'<title>{escape(title)}</title>'
            f"<style>{style}</style></head><body>{body}</body></html>")
