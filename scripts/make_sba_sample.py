"""Write tests/fixtures/sba_sample.parquet: a small stratified sample of the cleaned SBA loans.

Stratified by approval fiscal year and outcome (charged off within 24 months / later / paid in
full), capped per stratum. Charge-offs are over-represented on purpose so that the tests have
enough positives; the tests never read rates off the sample as if they were the population's.

    python scripts/make_sba_sample.py   # needs the download (flywheel demo fetches it)
"""

from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.config import cache_dir
from flywheel.demo.sba import load_clean

CAPS = {"early_chgoff": 200, "late_chgoff": 250, "paid": 1200}
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sba_sample.parquet"


def main() -> None:
    frame, _ = load_clean(cache_dir())
    frame = frame[(frame.approval_fy >= 1990) & (frame.approval_fy <= 2012)]
    approved = pd.to_datetime(frame.approval_date)
    charged = pd.to_datetime(frame.chgoff_date)
    early = (frame.mis_status == "CHGOFF") & (charged <= approved + pd.DateOffset(months=24))
    outcome = np.where(early, "early_chgoff",
                       np.where(frame.mis_status == "CHGOFF", "late_chgoff", "paid"))
    rng = np.random.default_rng(20261126)
    parts = []
    for (_, kind), group in frame.groupby([frame.approval_fy, outcome]):
        take = min(len(group), CAPS[kind])
        parts.append(group.iloc[rng.choice(len(group), take, replace=False)])
    sample = pd.concat(parts).drop(columns=["name", "city"]).sort_values("loan_nr")
    sample.reset_index(drop=True).to_parquet(OUT, index=False, compression="zstd")
    print(f"{len(sample)} rows -> {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
