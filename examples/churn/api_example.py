"""Flywheel from Python on the churn example: `python examples/churn/api_example.py [WORKDIR]`.

Loads 2019-2022 customers, trains the first model, scores the 2023 customers as a DataFrame (their
churn rose on the basic plan), adds them to the table and retrains at the start of 2024, then
prints what the champion is and what it was trained on. Everything goes under WORKDIR (default: a
new temporary folder); it takes about a minute.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import date
from pathlib import Path

from sklearn.metrics import roc_auc_score

from flywheel import api

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_data import customers  # noqa: E402 - the example's own data, made on the fly


def main(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    rows = customers()
    before, recent = rows[rows.signup_date < "2023-01-01"], rows[rows.signup_date >= "2023-01-01"]
    before.to_csv(workdir / "history.csv", index=False)
    recent.to_csv(workdir / "recent.csv", index=False)

    project = api.load(HERE / "flywheel.yaml", env={"FLYWHEEL_HOME": str(workdir / ".flywheel")})
    loaded = api.ingest(project, workdir / "history.csv")
    print(f"loaded {loaded.rows:,} customers")
    first = api.train(project)
    print(f"v{first.version}: holdout ROC-AUC {first.metrics['roc_auc']:.3f}, "
          f"gate {'passed' if first.gate.passed else 'failed'}, promoted {first.promoted}")

    scored = api.predict(project, recent, keep=("churned",))
    auc = roc_auc_score(scored["churned"] == "yes", scored["probability"])
    print(f"scored {len(scored):,} customers of 2023 with v{scored.attrs['model_version']}: "
          f"ROC-AUC {auc:.3f} once their labels are in")

    api.ingest(project, workdir / "recent.csv", append=True)
    run = api.retrain(project, at=date(2024, 1, 1), reason="a year of new customers")
    print(f"retrain {run.id}: {run.status}, v{run.version} "
          f"{'promoted' if run.promoted else 'not promoted'}")

    champion = api.status(project).champion
    assert champion is not None
    trained = champion.trained_on
    print(f"champion v{champion.version}: trained on {trained.rows or 0:,} rows "
          f"{trained.start}..{trained.end} ({trained.rows_from})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="flywheel-churn-")))
