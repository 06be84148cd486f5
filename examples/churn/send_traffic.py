"""Send customers to a running `flywheel serve` as live traffic, then (with --labels) their labels.

    python examples/churn/send_traffic.py arriving.csv [--url http://127.0.0.1:8000] [--labels]

Each row becomes a request record with the inputs the served model asks for (read from the
server's /openapi.json) and a `meta` block with the customer's id and signup date (its event
time); with --labels, each answer's record id is posted back to /v1/feedback with the row's
`churned` label, as a team's label pipeline would once the outcome is known.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

# Waits out 503 (the state database busy) and 429 (the server full) as their Retry-After asks.
from flywheel.serving.http.client import post_with_retry


def served_inputs(client: httpx.Client) -> list[str]:
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    record = body["oneOf"][0]
    return [name for name in record["properties"] if name != "meta"]


def records(rows: pd.DataFrame, inputs: list[str]) -> list[dict[str, Any]]:
    out = []
    for row in rows.to_dict("records"):
        rec: dict[str, Any] = {c: None if isinstance(row[c], float) and math.isnan(row[c]) else row[c]
                               for c in inputs}
        rec["meta"] = {"entity_id": row["customer_id"], "event_time": row["signup_date"]}
        out.append(rec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--labels", action="store_true", help="post each row's label as feedback")
    args = parser.parse_args()
    rows = pd.read_csv(args.file)
    with httpx.Client(base_url=args.url, timeout=60) as client:
        batch = records(rows, served_inputs(client))
        ids: list[str] = []
        for start in range(0, len(batch), 200):
            answer = post_with_retry(client, "/v1/predict", json=batch[start:start + 200])
            answer.raise_for_status()
            ids += [p["record_id"] for p in answer.json()["predictions"]]
        print(f"{len(ids):,} predictions served by v{answer.json()['version']}")
        if args.labels:
            labels = [{"record_id": rid, "label": int(y == "yes")}
                      for rid, y in zip(ids, rows["churned"], strict=True)]
            sent = post_with_retry(client, "/v1/feedback", json={"labels": labels})
            sent.raise_for_status()
            print(f"{sent.json()['accepted']:,} labels posted back")


if __name__ == "__main__":
    main()
