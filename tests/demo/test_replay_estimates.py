"""The replay's report on estimation: the estimate judged against the realized value beside two
naive forecasts, and the quarters whose band did not hold it (the audit's flags)."""

from __future__ import annotations

import pytest

from flywheel.demo.replay import QuarterResult, estimation_summary, markdown_report


def quarter(name: str, loop: float, estimated: float | None, promised: float, last: float | None,
            band: float = 0.02) -> QuarterResult:
    q = QuarterResult(name, "2002-01-01", 10_000, 0, 0.05, [1], loop_auc=loop, promised_auc=promised,
                      labelled_window_auc=last)
    if estimated is not None:
        q.estimated_auc, q.estimated_low, q.estimated_high = estimated, estimated - band, estimated + band
        q.covered = q.estimated_low <= loop <= q.estimated_high
        q.audit_flag = not q.covered
    else:
        q.estimate_note = "v1's probabilities could not be calibrated: too few"
    return q


def test_the_estimate_is_judged_beside_the_holdout_carried_forward_and_the_last_window():
    results = [quarter("FY2002Q1", 0.70, 0.69, 0.74, None), quarter("FY2002Q2", 0.64, 0.69, 0.74, 0.71),
               quarter("FY2002Q3", 0.66, None, 0.74, 0.70)]
    summary = estimation_summary(results)
    assert summary["quarters_estimated"] == 2 and summary["covered"] == 1 and summary["flagged"] == 1
    assert summary["mae_estimate"] == pytest.approx((0.01 + 0.05) / 2)
    assert summary["mae_holdout_carried_forward"] == pytest.approx((0.04 + 0.10) / 2)
    assert summary["mae_last_realized_window"] == pytest.approx(0.07)  # no window was known in Q1
    assert summary["why_not"] == ["v1's probabilities could not be calibrated: too few"]
    report = {"quarters": [vars(q) for q in results], "estimation": summary, "mean_static_auc": 0.6,
              "mean_loop_auc": 0.66, "mean_oracle_auc": 0.67, "loop_vs_oracle": 0.98, "loop_retrains": 0,
              "loop_promotions": 0, "oracle_retrains": 3, "retrains": [], "rules": {}}
    text = markdown_report(report)
    assert "2 of 3 quarters estimated when served" in text and "estimate **0.030**" in text
    assert "| 0.690 [0.670, 0.710] | FLAG |" in text and "| - | - |" in text
