"""The control room's HTML: every section rendered on the server from `data`'s dicts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from flywheel.room import charts

STYLE = """
:root{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#111827;background:#f9fafb}
body{margin:0 auto;max-width:1200px;padding:12px}
header{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:baseline}
h1{font-size:1.4rem;margin:0}h2{font-size:1.1rem;margin:0 0 8px}h3{font-size:.95rem;margin:8px 0 4px}
nav a{margin-right:10px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px;margin:12px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.wide{grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr))}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:8px}
table{border-collapse:collapse;width:100%;font-size:.85rem}
td,th{border-bottom:1px solid #f3f4f6;padding:3px 6px;text-align:left;vertical-align:top}
.scroll{overflow-x:auto}
.chart{width:100%;height:auto;font-size:10px;fill:#374151}.chart .axis{font-weight:600}
.legend{font-size:.8rem}.key{margin-right:12px}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px}
.pass{color:#15803d;font-weight:600}.fail{color:#b91c1c;font-weight:600}
.empty{color:#6b7280;font-style:italic}
.muted{color:#6b7280;font-size:.8rem}
button{padding:6px 12px;border-radius:6px;border:1px solid #1d4ed8;background:#2563eb;color:#fff;
cursor:pointer}
button.danger{background:#b91c1c;border-color:#991b1b}
input{padding:5px;border:1px solid #d1d5db;border-radius:6px}
#action-result{display:block;margin-top:6px;font-size:.9rem}
code{font-size:.8rem;word-break:break-all}
"""

SCRIPT = """
const room = document.body.dataset.base;
async function act(kind, version) {
  const token = document.getElementById('admin-token').value;
  const out = document.getElementById('action-result');
  const what = kind === 'promote' ? `make v${version} the champion` : 'roll the champion back';
  if (!confirm(`Really ${what}?`)) return;
  out.textContent = 'working...';
  const r = await fetch(`${room}api/${kind}`, {method: 'POST', headers: {
      'content-type': 'application/json', 'authorization': `Bearer ${token}`},
      body: JSON.stringify(kind === 'promote' ? {version: version} : {})});
  const body = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) { out.textContent = `refused (${r.status}): ${body.detail}`; out.className = 'fail'; return; }
  out.className = 'pass';
  out.textContent = `champion is now v${body.version}; waiting for the servers to swap...`;
  for (let i = 0; i < 60; i++) {
    const s = await (await fetch(`${room}api/served`)).json();
    if (s.version === body.version || s.error) break;
    await new Promise(res => setTimeout(res, 1000));
  }
  location.reload();
}
document.querySelectorAll('button[data-action]').forEach(b =>
  b.addEventListener('click', () => act(b.dataset.action, Number(b.dataset.version))));
"""


def page(sections: dict[str, Any], base: str, range_: str, mlflow_url: str | None) -> str:
    """The whole page; a section whose data could not be read says why, the others still show."""
    head = sections["header"]
    body = [
        f'<header><h1>{escape(head["project"])}</h1><span class="muted">model {escape(head["model"])} · '
        f'{escape(head["kind"])} · gate metric {escape(head["gate_metric"])} · '
        f'{escape(sections["now"])}</span></header>',
        '<nav><a href="#models">Models</a><a href="#traffic">Traffic</a><a href="#drift">Drift</a>'
        '<a href="#performance">Performance</a><a href="#pipelines">Pipelines</a></nav>',
        _or_error("models", "Models", sections["models"],
                  lambda m: models_section(m, sections["served"], mlflow_url)),
        _or_error("traffic", "Traffic", sections["traffic"], lambda t: traffic_section(t, base, range_)),
        _or_error("drift", "Drift", sections["drift"],
                  lambda d: drift_section(d, sections["distribution"], base)),
        _or_error("performance", "Performance", sections["performance"], performance_section),
        _or_error("pipelines", "Pipeline runs", sections["pipelines"], pipelines_section),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,">'
            f'<title>{escape(head["project"])}: control room</title><style>{STYLE}</style></head>'
            f'<body data-base="{escape(base)}">{"".join(body)}<script>{SCRIPT}</script></body></html>')


def _or_error(anchor: str, title: str, data: dict[str, Any], render: Callable[[Any], str]) -> str:
    if "error" in data:
        return (f'<section id="{anchor}"><h2>{title}</h2><p class="fail">could not be read: '
                f'{escape(data["error"])}</p></section>')
    return render(data)


def _version_card(title: str, v: dict[str, Any] | None, model: str, mlflow_url: str | None) -> str:
    if v is None:
        return f'<div class="card"><h3>{title}</h3><p class="empty">none</p></div>'
    link = f'v{v["version"]}'
    if mlflow_url:
        link = (f'<a href="{escape(mlflow_url.rstrip("/"))}/#/models/{quote(model)}/versions/'
                f'{v["version"]}">{link}</a>')
    t = v.get("trained_on") or {}
    gate = v.get("gate")
    gate_html = (f'<span class="{"pass" if gate == "passed" else "fail"}">{escape(str(gate))}</span>'
                 if gate else "—")
    link += f' · <a href="cards/{v["version"]}">model card</a>'
    rows = [("version", link), ("model type", escape(str(v.get("model_type") or "—"))),
            ("trained on", escape(f'{t.get("from") or "?"} to {t.get("to") or "?"} '
                                  f'({t.get("rows") or "?"} rows from {t.get("rows_from")})')),
            ("data hash", f'<code>{escape(str(v.get("data_hash") or "—"))}</code>'),
            ("run", f'<code>{escape(str(v.get("run_id")))}</code>'), ("gate", gate_html)]
    rows += [(escape(k), escape(charts._fmt(val))) for k, val in sorted((v.get("metrics") or {}).items())]
    table = "".join(f"<tr><th>{k}</th><td>{val}</td></tr>" for k, val in rows)
    reasons = escape(str(v.get("gate_reasons") or ""))
    return (f'<div class="card"><h3>{title}</h3><table>{table}</table>'
            f'{f"<p class=muted>{reasons}</p>" if reasons else ""}</div>')


def models_section(m: dict[str, Any], served: dict[str, Any], mlflow_url: str | None) -> str:
    champion, challenger = m["champion"], m["challenger"]
    served_text = (f'serving v{served["version"]}' if served.get("version") is not None
                   else f'server: {served.get("error") or "not answering"}')
    buttons = ['<label>admin token <input id="admin-token" type="password" autocomplete="off"></label>']
    if challenger and (not champion or challenger["version"] != champion["version"]):
        buttons.append(f'<button data-action="promote" data-version="{challenger["version"]}">'
                       f'Promote v{challenger["version"]}</button>')
    if champion:
        buttons.append('<button class="danger" data-action="rollback">Roll back</button>')
    history = "".join(
        f'<tr><td>{escape(h["moved_at"] or "")[:19]}</td><td>{escape(h["alias"])}</td>'
        f'<td>{_v(h["previous_version"])} → {_v(h["version"])}</td><td>{escape(h["action"])}</td>'
        f'<td>{escape(h["actor"] or "")}</td><td>{escape(h["reason"])}</td></tr>' for h in m["history"])
    return (f'<section id="models"><h2>Models <span class="muted" id="served">{escape(served_text)}'
            f'</span></h2><div class="grid">{_version_card("Champion", champion, m["model"], mlflow_url)}'
            f'{_version_card("Challenger", challenger, m["model"], mlflow_url)}</div>'
            f'{_same_holdout(m.get("same_holdout"))}{_rollout(m.get("rollout"))}'
            f'<p>{" ".join(buttons)}<output id="action-result"></output></p>'
            f'<h3>Alias history</h3><div class="scroll"><table><tr><th>when (UTC)</th><th>alias</th>'
            f'<th>move</th><th>action</th><th>who</th><th>why</th></tr>{history}</table></div></section>')


def _same_holdout(same: dict[str, Any] | None) -> str:
    if not same:
        return ""
    c, k = same["challenger_version"], same["champion_version"]
    rows = "".join(f'<tr><td>{escape(name)}</td><td>{charts._fmt(v["challenger"])}</td>'
                   f'<td>{charts._fmt(v["champion"])}</td></tr>' for name, v in same["metrics"].items())
    size = f' ({charts._fmt(same["rows"])} rows)' if same.get("rows") else ""
    return (f'<h3>On the same holdout{size}: challenger v{c} against the champion it was gated '
            f'against, v{k}</h3><div class="scroll"><table id="same-holdout"><tr><th>metric</th>'
            f'<th>v{c}</th><th>v{k}</th></tr>{rows}</table></div>')


def _rollout(r: dict[str, Any] | None) -> str:
    """The running (or latest) rollout: its versions, state, and the evidence so far."""
    if not r:
        return ""
    e = r.get("evidence") or {}
    g = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    rows = [("state", f'{r["status"]}: {r["reason"]}'), ("started", (r["started_at"] or "")[:19]),
            ("ended", (r["ended_at"] or "—")[:19]), ("shadow answers", charts._fmt(r["shadow_answers"])),
            ("labelled pairs", charts._fmt(e.get("pairs", 0)))]
    if e.get("difference") is not None:
        rows += [(f'{e["loss"]}: champion / challenger',
                  f'{g(e["champion_loss"])} / {g(e["challenger_loss"])}'),
                 ("difference (champion − challenger) and its confidence sequence",
                  f'{e["difference"]:+.4g} [{g(e["low"])}, {g(e["high"])}] at a '
                  f'{e["false_promotion_rate"]:.0%} false-promotion rate'),
                 ("answers that differ",
                  f'{e["differ_share"]:.1%}' if e.get("differ_share") is not None else "—")]
    before = e.get("estimated") or {}
    if before.get("rows"):
        rows.append((f'estimated {before["metric"]} before the labels '
                     f'({charts._fmt(before["rows"])} answers)',
                     f'champion {g(before["champion"])} / challenger {g(before["challenger"])}'))
    for c in e.get("segments") or []:
        bounds = f' [{g(c["low"])}, {g(c["high"])}]' if c["tested"] else " (too few pairs to test)"
        rows.append((f'segment {c["segment"]} = {c["group"]} ({charts._fmt(c["pairs"])} pairs)',
                     f'difference {g(c["difference"])}{bounds}'))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return (f'<h3>{escape(r["mode"].capitalize())} rollout {r["id"]}: challenger '
            f'v{r["challenger_version"]} against v{r["champion_version"]}</h3>'
            f'<div class="scroll"><table id="rollout">{body}</table></div>')


def _v(version: int | None) -> str:
    return "—" if version is None else f"v{version}"


def _version_name(v: str) -> str:
    return f"v{escape(v)}" if v != "0" else "no model (feedback, ...)"


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def traffic_section(t: dict[str, Any], base: str, range_: str) -> str:
    by_version: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for s in t["series"]:
        if not s["model_version"]:
            continue  # requests no model answered (feedback, refusals before loading): totals only
        v = f'v{s["model_version"]}'
        x = _ts(s["start"])
        for key in ("rps", "p50_ms", "p99_ms", "error_rate", "client_error_rate"):
            if s[key] is not None:
                by_version.setdefault(key, {}).setdefault(v, []).append((x, s[key]))
    latency = {f"{v} {q}": pts for q in ("p50_ms", "p99_ms") for v, pts in by_version.get(q, {}).items()}
    errors = {f"{v} {name}": pts for key, name in (("error_rate", "5xx"), ("client_error_rate", "4xx"))
              for v, pts in by_version.get(key, {}).items()}
    empty = "No requests in this range (a server writes its counts every few seconds)."
    totals = "".join(f'<tr><td>{_version_name(v)}</td><td>{x["requests"]}</td><td>{x["server_errors"]}</td>'
                     f'<td>{x["client_errors"]}</td><td>{x["log_dropped"]}</td></tr>'
                     for v, x in sorted(t["totals"].items()))
    other = "day" if range_ == "hour" else "hour"

    def chart(series: dict[str, list[tuple[float, float]]], unit: str) -> str:
        return charts.line_chart(series, y_label=unit, empty=empty, y_min=0,
                                 x_range=(_ts(t["since"]), _ts(t["until"])))

    return (f'<section id="traffic"><h2>Traffic, last {range_} <a class="muted" href="{base}?range={other}'
            f'#traffic">show the last {other}</a></h2><div class="grid wide">'
            f'<div><h3>Requests per second</h3>{chart(by_version.get("rps", {}), "req/s")}</div>'
            f'<div><h3>Latency (ms, from a histogram)</h3>{chart(latency, "ms")}</div>'
            f'<div><h3>Error rates</h3>{chart(errors, "share")}</div>'
            f'<div><h3>Totals</h3><table><tr><th>version</th><th>requests</th><th>5xx</th><th>4xx</th>'
            f'<th>log drops</th></tr>{totals}</table></div></div></section>')


def drift_section(d: dict[str, Any], dist: dict[str, Any], base: str) -> str:
    windows = d["windows"]
    reports = "".join(
        f'<tr><td>{w["id"]}</td><td>{escape(str(w["start"] or "")[:10])} to '
        f'{escape(str(w["end"] or "")[:10])}</td><td>v{w["model_version"]}</td><td>{w["rows"]}</td>'
        f'<td>{charts._fmt(w["drift_share"])}</td>'
        f'<td class="{"fail" if w["drifted"] else "pass"}">{"drift" if w["drifted"] else "no drift"}</td>'
        f'<td>{_report_link(base, w)}</td></tr>' for w in reversed(windows[-20:]))
    if "error" in dist:
        chart = f'<p class="fail">could not be read: {escape(dist["error"])}</p>'
    elif dist["kind"] == "classes":
        chart = charts.class_bars(dist["counts"])
    elif dist["kind"] == "none":
        chart = '<p class="empty">No predictions logged yet.</p>'
    else:
        chart = charts.histogram(dist["edges"], dist["counts"], x_label=dist["kind"])
    return (f'<section id="drift"><h2>Drift</h2><p class="muted">Colour: each feature\'s drift score '
            f'over its threshold ({charts._fmt(d["drift_threshold"] or 0)}; red at twice it, outlined '
            f'when drifted); bottom row: the window\'s verdict (drift when at least '
            f'{charts._fmt(d["drift_share"] or 0)} of the features drift).</p>'
            f'<div class="scroll">{charts.heat_map(d["features"], windows, d["cells"])}</div>'
            f'<div class="grid"><div><h3>Predictions (latest {dist["rows"]})</h3>{chart}</div>'
            f'<div class="scroll"><h3>Windows</h3><table><tr><th>#</th><th>window</th><th>version</th>'
            f'<th>rows</th><th>share</th><th>verdict</th><th>Evidently</th></tr>{reports}</table></div>'
            f'</div></section>')


def _report_link(base: str, window: dict[str, Any]) -> str:
    return f'<a href="{base}reports/{window["id"]}">report</a>' if window["has_report"] else "—"


def _seconds(value: float | None) -> str:
    return "" if value is None else f" {value:.1f}s"


ESTIMATED = "estimated"


def performance_section(p: dict[str, Any]) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for point in p["points"]:
        series.setdefault(f'v{point["version"]}', []).append((_ts(point["at"]), point["value"]))
    promised = {f"v{v} promised": value for v, value in p["promised"].items()}
    marks = [(_ts(x["at"]), f'v{x["version"]} {x["action"]} {x["at"][:19]}') for x in p["promotions"]]
    marks += [(_ts(x["at"]), f'retrain ({x["trigger"]}, {x["status"]}) {x["at"][:19]}')
              for x in p["retrains"]]
    estimated = [(_ts(e["at"]), e["value"]) for e in p.get("estimates", [])]
    if estimated:
        series[ESTIMATED] = estimated
    marks += [(_ts(x["at"]), f'audit: probable concept shift (v{x["version"]}) {x["at"][:19]}')
              for x in p.get("concept_shifts", [])]
    bands = {ESTIMATED: [(_ts(e["at"]), e["low"], e["high"]) for e in p.get("estimates", [])
                         if e["low"] is not None and e["high"] is not None]}
    metric = p["metric"] or "metric"
    chart = charts.line_chart(series, y_label=metric, lines=promised, marks=marks, bands=bands,
                              empty="No monitoring window with labels or an estimate yet.")
    return (f'<section id="performance"><h2>Performance: {escape(metric)} per monitoring window</h2>'
            f'<p class="muted">Per version: the metric realized on the window\'s labels. '
            f'{ESTIMATED}: what the window\'s answers alone predicted, before any label, with its band '
            f'(shaded). Dashed: what each serving version promised on its holdout. Orange lines: '
            f'promotions, rollbacks, retrains and windows the audit flagged.</p>{chart}</section>')


def pipelines_section(p: dict[str, Any]) -> str:
    rows = []
    for r in p["runs"]:
        steps = " ".join(f'<span class="{"fail" if s["status"] == "failed" else ""}">{escape(s["step"])}'
                         f'{_seconds(s["seconds"])}</span>' for s in r["steps"])
        gate = r["gate"]
        gate_html = "—" if gate is None else (
            f'<span class="{"pass" if gate["passed"] else "fail"}">{"passed" if gate["passed"] else "failed"}'
            f'</span> <span class="muted">{escape("; ".join(gate["reasons"]))}</span>')
        rows.append(f'<tr><td>{escape((r["started_at"] or "")[:19])}</td><td>{escape(r["trigger"])}</td>'
                    f'<td class="{"fail" if r["status"] == "failed" else ""}">{escape(r["status"])}</td>'
                    f'<td>{steps}</td><td>{gate_html}</td>'
                    f'<td>{_v(r["version"]) if r["promoted"] else "—"}</td><td>{escape(r["alert"] or "—")}'
                    f'</td><td class="muted">{escape(r["error"] or "")}</td></tr>')
    table = "".join(rows) or '<tr><td colspan="8" class="empty">No pipeline run yet.</td></tr>'
    return (f'<section id="pipelines"><h2>Pipeline runs</h2><div class="scroll"><table><tr><th>started (UTC)'
            f'</th><th>trigger</th><th>status</th><th>steps</th><th>gate</th><th>promoted</th><th>alert</th>'
            f'<th>error</th></tr>{table}</table></div></section>')
