"""Make the churn example's data: `python examples/churn/make_data.py [FOLDER] [--rows N]`.

Writes FOLDER/customers.csv (the customers who signed up in 2019-2022: the history to train on)
and FOLDER/arriving.csv (those of 2023: the traffic a served model meets, with their labels).

Synthetic subscription customers, 2019-2023, one row per customer: who signed up when, on which
plan, from which channel, how much they spend and how often they called support, and whether they
churned within a year (`churned`: yes/no). From 2023 a price rise on the basic plan makes its
customers leave more often: the drift the loop is there to notice. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def customers(rows: int = 8000, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    days = np.sort(rng.integers(0, 5 * 365, rows))
    signup = pd.Timestamp("2019-01-01") + pd.to_timedelta(days, unit="D")
    plan = rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.35, 0.15])
    channel = rng.choice(["web", "store", "partner", "phone"], rows, p=[0.5, 0.2, 0.2, 0.1])
    age = rng.integers(18, 80, rows)
    spend = np.round(rng.gamma(2.0, 18.0, rows) + np.select([plan == "plus", plan == "pro"], [20, 60], 0), 2)
    calls = rng.poisson(np.where(plan == "basic", 1.5, 0.8))
    tenure_discount = rng.random(rows) < 0.3
    late_basic = (signup >= pd.Timestamp("2023-01-01")) & (plan == "basic")
    score = (-1.6 + 0.45 * calls - 0.012 * (age - 45) - 0.6 * tenure_discount
             + 0.4 * (channel == "partner") - 0.004 * spend + 1.3 * late_basic
             + rng.normal(0, 0.9, rows))
    spend_missing = rng.random(rows) < 0.02  # some billing records arrive late
    return pd.DataFrame({
        "customer_id": [f"C{100000 + i}" for i in range(rows)],
        "signup_date": signup.strftime("%Y-%m-%d"),
        "plan": plan,
        "channel": channel,
        "age": age,
        "monthly_spend": np.where(spend_missing, np.nan, spend),
        "support_calls": calls,
        "discount": np.where(tenure_discount, "yes", "no"),
        "churned": np.where(score > 0, "yes", "no"),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=".", type=Path)
    parser.add_argument("--rows", type=int, default=8000)
    args = parser.parse_args()
    frame = customers(args.rows)
    args.folder.mkdir(parents=True, exist_ok=True)
    late = frame["signup_date"] >= "2023-01-01"
    for name, part in (("customers.csv", frame[~late]), ("arriving.csv", frame[late])):
        part.to_csv(args.folder / name, index=False)
        print(f"wrote {len(part):,} customers ({(part.churned == 'yes').mean():.1%} churned) "
              f"to {args.folder / name}")


if __name__ == "__main__":
    main()
