from datetime import date

import pandas as pd

from flywheel.demo.sba import LEAKY_DROPPED, RENAMES, clean


def raw_rows() -> pd.DataFrame:
    base = {c: "" for c in [*RENAMES, *LEAKY_DROPPED]}
    rows = []
    for i, (approved, fy, status, chgoff) in enumerate([
        ("28-Feb-97", "1997", "P I F", ""),
        ("03-Jan-66", "1966", "CHGOFF", "15-Mar-68"),   # two-digit years before 1969
        ("01-Oct-05", "2006", "CHGOFF", "01-Jun-07"),
        ("01-Oct-05", "1976A", "", ""),                   # no status: dropped
    ]):
        rows.append({**base, "LoanNr_ChkDgt": str(i), "ApprovalDate": approved, "ApprovalFY": fy,
                     "MIS_Status": status, "ChgOffDate": chgoff, "GrAppv": "$60,000.00 ",
                     "SBA_Appv": "$1,234,567.50 ", "DisbursementGross": "$0.00 ",
                     "ChgOffPrinGr": "$5.00 ", "BalanceGross": "$0.00 ", "NewExist": "2",
                     "Term": "84", "RevLineCr": " ", "State": "IN"})
    return pd.DataFrame(rows)


def test_clean_parses_money_and_dates_and_fixes_the_century():
    out, report = clean(raw_rows())
    assert out["gr_appv"].tolist() == [60000.0] * 3
    assert out["sba_appv"].iloc[0] == 1234567.5
    assert out["approval_date"].tolist() == [date(1997, 2, 28), date(1966, 1, 3), date(2005, 10, 1)]
    assert out["chgoff_date"].iloc[1] == date(1968, 3, 15)
    assert report.dates_fixed_century == 2


def test_clean_drops_leaky_outcome_columns_and_rows_without_status():
    out, report = clean(raw_rows())
    assert report.raw_rows == 4 and report.rows == 3 and report.dropped_no_status == 1
    assert not {"chgoffpringr", "chg_off_prin_gr", "balance_gross", *LEAKY_DROPPED} & set(out.columns)
    assert out["rev_line_cr"].isna().all()  # blanks become missing, not a category " "
    assert out["new_exist"].tolist() == [2, 2, 2]


def test_a_demo_rerun_loads_the_source_only_when_the_records_or_the_table_changed(tmp_path):
    import sqlalchemy as sa

    from flywheel.data.sources import make_engine, write_table
    from flywheel.demo.sba import loaded_unchanged, mark_loaded

    frame = pd.DataFrame({"loan_nr": ["1", "2", "3"], "approval_fy": [2001, 2002, 2003]})
    (tmp_path / "sba").mkdir()
    frame.to_parquet(tmp_path / "sba" / "loans-clean.parquet")
    url, home = f"sqlite:///{tmp_path / 'source.db'}", tmp_path / "home"
    types = {"loan_nr": sa.String(20), "approval_fy": sa.Integer()}
    assert not loaded_unchanged(home, url, "loans", tmp_path, 3)  # never loaded
    write_table(frame, url, "loans", types)
    mark_loaded(home, url, "loans", tmp_path, 3)
    assert loaded_unchanged(home, url, "loans", tmp_path, 3)
    assert not loaded_unchanged(home, url, "other", tmp_path, 3)
    with make_engine(url).begin() as conn:
        conn.execute(sa.text("DELETE FROM loans WHERE loan_nr = '3'"))  # someone edited the table
    assert not loaded_unchanged(home, url, "loans", tmp_path, 3)
    write_table(frame, url, "loans", types)
    frame.assign(approval_fy=2004).to_parquet(tmp_path / "sba" / "loans-clean.parquet")  # new records
    assert not loaded_unchanged(home, url, "loans", tmp_path, 3)
