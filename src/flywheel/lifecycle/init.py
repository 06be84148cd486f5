"""`flywheel init`: profile a table, propose the time column and the features, screen them for
leakage, and write a commented flywheel.yaml that `flywheel train` accepts as it is."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import CategoryFeature, NumericFeature, SplitConfig, load_project
from flywheel.core.errors import FlywheelError
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.data import features as feats
from flywheel.data.checks import standalone_auc, standalone_macro_auc, standalone_r2
from flywheel.data.sources import make_engine
from flywheel.lifecycle.intake import ingest, read_rows
from flywheel.training.split import SplitError, split_by_time, workable_fractions

LEAK_AUC = 0.9  # the default of checks.leakage_auc_threshold
LEAK_R2 = 0.75  # the default of checks.leakage_r2_threshold
MAX_CLASSES = 50  # more distinct values than this: not a multiclass target
MAX_CATEGORIES = 50
SCREEN_ROWS = 200_000


class InitError(FlywheelError, ValueError):
    """The data cannot make a project as it is; the message says what to add or choose."""


@dataclass(frozen=True)
class ColumnProfile:
    name: str
    dtype: str
    nulls: float  # fraction
    distinct: int
    role: str  # id | time | target | numeric | category | skipped
    why: str = ""


@dataclass
class Proposal:
    """What `init` found and proposes; `render_config` writes it with the reasons as comments."""

    project: str
    table: str
    rows: int
    id_column: str
    time_column: str
    time_unit: str
    time_why: str
    window: tuple[str, str]
    target: str
    positive: Any  # binary; None for the other tasks
    positive_rate: float  # binary: the positive share; regression: the mean; multiclass: NaN
    columns: list[ColumnProfile]
    features: list[dict[str, Any]] = field(default_factory=list)
    leaky: dict[str, float] = field(default_factory=dict)  # proposed, then left out
    scores: dict[str, float] = field(default_factory=dict)  # standalone ROC-AUC of each feature
    time_format: str | None = None  # for dates written as text in another shape than ISO
    task: str = "binary"
    classes: list[str] = field(default_factory=list)  # multiclass, with each class's share
    class_shares: list[float] = field(default_factory=list)
    target_std: float = float("nan")  # regression
    split: tuple[float, float] | None = None  # (validation, holdout) when the defaults cannot split
    split_sizes: tuple[int, int, int] = (0, 0, 0)

    @property
    def measure(self) -> str:
        return {"regression": "R²", "multiclass": "macro ROC-AUC"}.get(self.task, "ROC-AUC")


def propose_project(frame: pd.DataFrame, target: str, time: str | None = None, project: str = "my-project",
            table: str = "rows", id_column: str | None = None, task: str | None = None) -> Proposal:
    """Profile `frame` and propose a project around `target`: a binary label (two values), a
    number to predict (regression) or one of a few classes (multiclass); `task` decides when given,
    else the target's values do."""
    if target not in frame.columns:
        raise InitError(f"no column '{target}' to predict; the data has: "
                        f"{', '.join(map(str, frame.columns))}")
    task = task or guess_task(frame[target])
    positive, rate = _positive_class(frame[target], target) if task == "binary" else (None, float("nan"))
    ident = id_column or _find_id(frame, exclude={target, time})
    when, unit, why = _find_time(frame, time, exclude={target, ident})
    fmt, doubt = _text_format(frame[when]) if unit == "text" else (None, "")
    times = _as_time(frame[when], unit, fmt)
    why += doubt
    profiles, features = _profile_features(frame, exclude={target, ident, when})
    low, high = times.min(), times.max()
    end = high + (pd.DateOffset(years=1) if unit == "year" else
                  pd.DateOffset(months=1) if unit == "month" else pd.Timedelta(days=1))
    window = (_in_unit(low, unit), _in_unit(end, unit))
    profiles += [ColumnProfile(ident, str(frame[ident].dtype), 0.0, int(frame[ident].nunique()), "id"),
                 ColumnProfile(when, str(frame[when].dtype), float(frame[when].isna().mean()),
                               int(frame[when].nunique()), "time", why),
                 ColumnProfile(target, str(frame[target].dtype), float(frame[target].isna().mean()),
                               int(frame[target].nunique()), "target")]
    proposal = Proposal(project, table, len(frame), ident, when, unit, why, window, target, positive,
                        rate, profiles, features, time_format=fmt, task=task)
    _describe_target(proposal, frame[target])
    _screen(proposal, frame)
    _fit_split(proposal, times[frame[target].notna().to_numpy()])  # the rows train will split
    return proposal


def _fit_split(p: Proposal, times: pd.Series) -> None:
    """Fractions that split these rows by time when the defaults cannot (a few distinct years);
    an InitError when nothing can, rather than a config that `train` refuses."""
    try:
        split_by_time(times, SplitConfig())
        return
    except SplitError:
        found = workable_fractions(times, SplitConfig())
    if found is None:
        raise InitError(f"'{p.time_column}' holds {times.nunique()} distinct time(s): a split by time "
                        "needs at least three (train, validation, holdout; rows that share a time stay "
                        "in one part); use a finer time column or more history")
    chosen = split_by_time(times, SplitConfig(validation_fraction=found[0], holdout_fraction=found[1]))
    p.split = found
    p.split_sizes = (len(chosen.train), len(chosen.validation), len(chosen.holdout))


def guess_task(values: pd.Series) -> str:
    """binary for two values; regression for numbers with many values (or any fractional one);
    multiclass for a few values (text, or up to MAX_CLASSES whole numbers)."""
    seen = values.dropna()
    distinct = int(seen.nunique())
    if distinct == 2:
        return "binary"
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and (distinct > MAX_CLASSES or not (seen == np.floor(seen)).all()):
        return "regression"
    if distinct < 2:
        raise InitError(f"'{values.name}' has {distinct} distinct value(s): there is nothing to predict")
    if distinct > MAX_CLASSES:
        raise InitError(f"'{values.name}' has {distinct:,} distinct texts: too many classes to learn "
                        f"(at most {MAX_CLASSES}); group them, or predict a number (--task regression)")
    return "multiclass"


def _describe_target(p: Proposal, values: pd.Series) -> None:
    if p.task == "regression":
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.notna().sum() < 2:
            raise InitError(f"'{p.target}' holds no numbers to predict (--task regression)")
        p.positive_rate, p.target_std = float(numbers.mean()), float(numbers.std())
    elif p.task == "multiclass":
        shares = values.dropna().astype(str).value_counts(normalize=True).sort_index()
        if len(shares) < 3:
            raise InitError(f"'{p.target}' has {len(shares)} classes: a multiclass target needs three "
                            "or more (two: --task binary)")
        p.classes, p.class_shares = [str(c) for c in shares.index], [float(v) for v in shares]

def _positive_class(values: pd.Series, name: str) -> tuple[Any, float]:
    seen = values.dropna().unique().tolist()
    if len(seen) != 2:
        raise InitError(f"'{name}' has {len(seen)} distinct values ({', '.join(map(str, seen[:5]))}"
                        f"{'…' if len(seen) > 5 else ''}); Flywheel predicts a label with two values")
    for usual in (1, True, "1", "yes", "Yes", "true", "True", "Y", "y"):
        if usual in seen:
            positive = usual
            break
    else:
        positive = values.value_counts().index[-1]  # the rarer value: what a model watches for
    positive = positive.item() if hasattr(positive, "item") else positive
    return positive, float((values == positive).mean())


def _find_id(frame: pd.DataFrame, exclude: set[str | None]) -> str:
    candidates = [c for c in frame.columns if c not in exclude and frame[c].notna().all()
                  and frame[c].is_unique and (pd.api.types.is_integer_dtype(frame[c])
                                               or frame[c].dtype == object)]
    named = [c for c in candidates if re.search(r"(^|_)(id|key|nr|no|number)$", str(c), re.I)]
    if named or candidates:
        return str((named or candidates)[0])
    raise InitError("no column identifies each row (unique and never empty): add one, such as a "
                    "row number, and give it with --id")


def _find_time(frame: pd.DataFrame, time: str | None, exclude: set[str | None]) -> tuple[str, str, str]:
    if time is not None:
        if time not in frame.columns:
            raise InitError(f"--time {time}: no such column")
        unit = _time_unit(frame[time], str(time))
        if unit is None and frame[time].dtype == object:
            seen = list(dict.fromkeys(frame[time].dropna().astype(str)))[:3]
            raise InitError(f"--time {time}: no single date format reads every value (for example "
                            f"{', '.join(seen)}); write the dates in one format (ISO: 2023-01-31), "
                            "or give data.time_format by hand")
        if unit is None:
            raise InitError(f"--time {time}: its values are neither dates, nor years, nor YYYYMM months")
        return time, unit, "chosen with --time"
    found = [(c, u) for c in frame.columns if c not in exclude
             for u in [_time_unit(frame[c], str(c))] if u is not None]
    rank = {"date": 0, "text": 1, "month": 2, "year": 3}
    if not found:
        raise InitError(
            "no column says when each row happened (a date, a datetime, a year or a YYYYMM month): "
            "Flywheel trains on the past and checks on the future, so add one (when the row was "
            "created or the decision made), or name it with --time")
    found.sort(key=lambda cu: rank[cu[1]])
    name, unit = found[0]
    others = ", ".join(str(c) for c, _ in found[1:])
    return str(name), unit, (f"the finest time column found ({unit})"
                             + (f"; also possible: {others}" if others else ""))


def _time_unit(values: pd.Series, name: str) -> str | None:
    sample = values.dropna().head(500)
    if sample.empty:
        return None
    if pd.api.types.is_datetime64_any_dtype(values):
        return "date"
    if pd.api.types.is_integer_dtype(values) or (pd.api.types.is_float_dtype(values)
                                                  and (sample == np.floor(sample)).all()):
        if sample.between(1900, 2100).all() and re.search(r"year|yr|fy", name, re.I):
            return "year"
        if sample.between(190001, 210012).all() and sample.mod(100).between(1, 12).all():
            return "month"
        return None
    if values.dtype == object and sample.map(lambda v: isinstance(v, str)).all():
        parsed = pd.to_datetime(sample, errors="coerce", format="ISO8601")
        if parsed.notna().mean() >= 0.99 and sample.str.match(r"^\d{4}-\d{2}-\d{2}").all():
            return "text"
        if _formats_reading(sample):
            return "text"
    return None


# Dates as text in the shapes that spreadsheets and exports write, day-first before month-first.
_DAYS = ["%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%m-%d-%Y", "%Y/%m/%d", "%d/%m/%y",
         "%m/%d/%y", "%d-%b-%Y", "%d-%b-%y", "%d %b %Y", "%b %d, %Y", "%d %B %Y", "%B %d, %Y"]
TEXT_FORMATS = [d + t for d in _DAYS for t in ("", " %H:%M", " %H:%M:%S")]


def _formats_reading(values: pd.Series) -> list[str]:
    """The text date formats that read every value."""
    text = values.dropna().astype(str)
    return [f for f in TEXT_FORMATS
            if pd.to_datetime(text, format=f, errors="coerce").notna().all()]


def _text_format(values: pd.Series) -> tuple[str | None, str]:
    """The format of a text date column (None for ISO), and a note when another format reads
    every value too (01/02/2023: 1 February or 2 January?)."""
    text = values.dropna().astype(str)
    if text.str.match(r"^\d{4}-\d{2}-\d{2}").all():
        return None, ""
    found = [f for f in _formats_reading(text.head(500))  # the sample narrows, the column decides
             if pd.to_datetime(text, format=f, errors="coerce").notna().all()]
    if not found:
        raise InitError(f"time column '{values.name}': no single date format reads every value "
                        f"(for example {', '.join(text.head(3))}); give data.time_format by hand")
    doubt = f"; {found[1]} also reads every value: check time_format" if len(found) > 1 else ""
    return found[0], f"; dates as text in {found[0]}{doubt}"


def _as_time(values: pd.Series, unit: str, fmt: str | None = None) -> pd.Series:
    if unit == "year":
        return pd.to_datetime(values.astype("Int64").astype(str) + "-01-01")
    if unit == "month":
        return pd.to_datetime(values.astype("Int64").astype(str) + "01", format="%Y%m%d")
    return pd.to_datetime(values, format=(fmt or "ISO8601") if unit == "text" else None)


def _in_unit(t: pd.Timestamp, unit: str) -> str:
    if unit == "year":
        return str(t.year)
    if unit == "month":
        return f"{t.year}{t.month:02d}"
    return str(t.date())


def _profile_features(frame: pd.DataFrame, exclude: set[str | None]
                      ) -> tuple[list[ColumnProfile], list[dict[str, Any]]]:
    profiles: list[ColumnProfile] = []
    features: list[dict[str, Any]] = []
    for col in frame.columns:
        if col in exclude:
            continue
        values = frame[col]
        nulls, distinct = float(values.isna().mean()), int(values.nunique())
        role, why = _feature_role(values, distinct, nulls, len(frame))
        profiles.append(ColumnProfile(str(col), str(values.dtype), nulls, distinct, role, why))
        name = re.sub(r"\W+", "_", str(col)).strip("_").lower() or f"f{len(features)}"
        while any(f["name"] == name for f in features):
            name += "_"
        if role == "numeric":
            features.append({"name": name, "kind": "numeric", "column": str(col)})
        elif role == "category":
            features.append({"name": name, "kind": "category", "column": str(col),
                             "max_categories": min(MAX_CATEGORIES, distinct)})
    return profiles, features


def _feature_role(values: pd.Series, distinct: int, nulls: float, rows: int) -> tuple[str, str]:
    if distinct <= 1:
        return "skipped", "constant"
    if nulls > 0.5:
        return "skipped", f"{nulls:.0%} empty (checks.max_null_fraction is 0.5)"
    if pd.api.types.is_bool_dtype(values):
        return "category", ""
    if pd.api.types.is_numeric_dtype(values):
        if pd.api.types.is_integer_dtype(values) and distinct == rows:
            return "skipped", "unique per row: an id, not a feature"
        return "numeric", ""
    if distinct <= max(MAX_CATEGORIES, rows // 20):
        return "category", ""
    return "skipped", f"{distinct:,} distinct texts: free text or an id"


def _screen(proposal: Proposal, frame: pd.DataFrame) -> None:
    """Each proposed feature's standalone score for the task; those at the leakage threshold are
    left out."""
    if not proposal.features:
        raise InitError("no column could be a feature (each is constant, mostly empty, free text or an id)")
    rows = frame.sample(min(len(frame), SCREEN_ROWS), random_state=0) if len(frame) > SCREEN_ROWS else frame
    kinds = {"numeric": NumericFeature, "category": CategoryFeature}
    defs = [kinds[f["kind"]](**f) for f in proposal.features]
    spec = feats.fit_spec(defs, rows)  # type: ignore[arg-type]  # a list of Feature
    if proposal.task != "binary":  # an empty target is a label not known yet
        rows = rows[rows[proposal.target].notna()]
    X = feats.build_matrix(spec, rows)
    target = rows[proposal.target]
    for i, f in enumerate(proposal.features):
        proposal.scores[f["name"]] = round(_standalone(proposal, X[:, i], target), 4)
    limit = LEAK_R2 if proposal.task == "regression" else LEAK_AUC
    proposal.leaky = {n: s for n, s in proposal.scores.items() if s >= limit}
    proposal.features = [f for f in proposal.features if f["name"] not in proposal.leaky]
    if not proposal.features:
        raise InitError("every candidate feature alone predicts the target almost perfectly "
                        f"({', '.join(proposal.leaky)}): they are likely recorded after the outcome")


def _standalone(p: Proposal, x: np.ndarray, target: pd.Series) -> float:
    if p.task == "regression":
        return standalone_r2(x, pd.to_numeric(target, errors="coerce").to_numpy(dtype=np.float64))
    if p.task == "multiclass":
        index = {c: i for i, c in enumerate(p.classes)}
        return standalone_macro_auc(x, np.array([index[str(v)] for v in target]), len(p.classes))
    return standalone_auc(x, (target == p.positive).to_numpy(dtype=np.int64))


def _target_lines(p: Proposal) -> list[str]:
    scalar = json_scalar
    head = ["  target:", "    kind: column   # the label is known as soon as the row exists",
            f"    column: {scalar(p.target)}"]
    if p.task == "regression":
        return [*head, f"    task: regression   # a number: mean {p.positive_rate:.4g}, "
                       f"standard deviation {p.target_std:.4g}"]
    if p.task == "multiclass":
        shares = ", ".join(f"{c} {s:.1%}" for c, s in zip(p.classes, p.class_shares, strict=True))
        return [*head, "    task: multiclass", f"    classes: {scalar(p.classes)}   # {shares}"]
    return [*head, f"    positive: {scalar(p.positive)}   # {p.positive_rate:.1%} of the rows"]


def _gate_lines(p: Proposal) -> list[str]:
    if p.task == "regression":
        return ["  metric: rmse", f"  floor: {p.target_std:.4g}   # the standard deviation: what "
                "predicting the mean gives", "  min_improvement: 0   # at least as good as the champion"]
    if p.task == "multiclass":
        prior = -sum(s * np.log(s) for s in p.class_shares if s > 0)
        return ["  metric: log_loss", f"  floor: {prior:.4g}   # what predicting the class shares gives",
                "  min_improvement: 0   # at least as good as the champion"]
    return ["  metric: roc_auc",
            "  floor: 0.55            # the least holdout ROC-AUC a first model must reach",
            "  min_improvement: 0.002 # a challenger must beat the champion by this on the same holdout"]


def render_config(p: Proposal, source: str | None = None) -> str:
    """The proposal as a commented flywheel.yaml."""
    scalar = json_scalar
    lines = [
        f"# Written by flywheel init from {p.rows:,} rows. Every choice below can be changed; the",
        "# README's configuration table lists every field.",
        f"project: {scalar(p.project)}",
        "",
        "stores:",
        f"  source: {scalar(source) if source else 'null'}     # the rows (null: .flywheel/source.db)",
        "  tracking: null   # MLflow's tracking store and registry (null: .flywheel/mlflow.db)",
        "  state: null      # Flywheel's own tables (null: .flywheel/state.db)",
        "",
        "data:",
        f"  table: {scalar(p.table)}",
        f"  id_column: {scalar(p.id_column)}",
        f"  time_column: {scalar(p.time_column)}    # {p.time_why}",
        f"  time_unit: {p.time_unit}",
        *([f"  time_format: {scalar(p.time_format)}"] if p.time_format else []),
        f"  window: {{start: {p.window[0]}, end: {p.window[1]}}}   # all the rows; end is exclusive",
        *_target_lines(p),
        "",
        f"features:   # standalone {p.measure} on these rows in brackets",
    ]
    for f in p.features:
        extra = f", max_categories: {f['max_categories']}" if f["kind"] == "category" else ""
        lines.append(f"  - {{name: {scalar(f['name'])}, kind: {f['kind']}, "
                     f"column: {scalar(f['column'])}{extra}}}   # [{p.scores[f['name']]:.3f}]")
    for name, score in p.leaky.items():
        lines.append(f"  # left out: {name} alone reaches {p.measure} {score:.3f}, a likely leak (a value")
        lines.append("  # recorded after the outcome); add it back only if it is known when you predict")
    skipped = [c for c in p.columns if c.role == "skipped"]
    for c in skipped:
        lines.append(f"  # not a feature: {c.name} ({c.why})")
    threshold = (f"  leakage_r2_threshold: {LEAK_R2}" if p.task == "regression"
                 else f"  leakage_auc_threshold: {LEAK_AUC}")
    lines += ["", "checks:", f"{threshold}   # a feature this strong alone stops training", "",
              "gate:", *_gate_lines(p), ""]
    if p.split:
        sizes = "/".join(f"{n:,}" for n in p.split_sizes)
        lines += ["split:   # the default 0.15/0.15 cannot cut these few times into three parts",
                  f"  validation_fraction: {p.split[0]}", f"  holdout_fraction: {p.split[1]}   # "
                  f"train/validation/holdout {sizes} rows", ""]
    return "\n".join(one_line(line) for line in lines)


# What YAML reads as a line break or refuses in a stream. Values are written as JSON scalars (which
# escape them); comments quote column names and class labels as the data has them, and a CSV header
# with a newline in it once wrote `serving.host: 0.0.0.0` into the config as a line of its own.
_BREAKS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ufeff]")


def one_line(text: str) -> str:
    """`text` as one line of YAML: line breaks and control characters written as escapes."""
    return _BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_scalar(value: Any) -> str:
    """A YAML scalar that reads back as the same value and type (JSON is YAML)."""
    return json.dumps(value)


@dataclass(frozen=True)
class InitResult:
    proposal: Proposal
    config_path: Path
    loaded: int  # rows loaded into the project's source database (0 when it reads a database of yours)


def init_project(source: str, target: str, output: Path, time: str | None = None,
                 table: str | None = None, id_column: str | None = None, project: str | None = None,
                 reporter: Reporter | None = None, task: str | None = None) -> InitResult:
    """Profile `source` (a .csv/.parquet file, or a database URL and `table`), write the config to
    `output`, and load a file into the new project's source database."""
    rep = reporter or QuietReporter()
    url = source if "://" in source else None
    with rep.step("Read and profile the data"):
        if url:
            if not table:
                raise InitError("--table: which table of the database to read")
            engine = make_engine(url)
            try:
                frame = pd.read_sql_table(table, engine)
            finally:
                engine.dispose()
        else:
            frame = read_rows(Path(source))
        name = project or _slug(output.resolve().parent.name) or "my-project"
        proposal = propose_project(frame, target, time, name, table or _slug(Path(source).stem) or "rows",
                                   id_column, task)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_config(proposal, url))
    made = load_project(output)  # what train will read: it must load as written
    loaded = 0
    if url is None:
        with rep.step(f"Load {proposal.rows:,} rows into {proposal.table}", total=proposal.rows) as adv:
            loaded = ingest(made, Path(source), progress=adv).added
    return InitResult(proposal, output, loaded)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
