"""The room's performance chart: the realized metric per version and, on the same axis, the
estimate made before the labels with its band, and the windows the audit flagged."""

from __future__ import annotations

import re

from flywheel.room.page import ESTIMATED, performance_section


def test_the_estimate_and_its_band_share_the_axis_with_the_realized_metric():
    history = {
        "metric": "roc_auc",
        "points": [{"at": "2026-01-01T00:00:00+00:00", "version": 1, "value": 0.70},
                   {"at": "2026-02-01T00:00:00+00:00", "version": 1, "value": 0.52}],
        "estimates": [{"at": "2026-01-01T00:00:00+00:00", "version": 1, "metric": "roc_auc",
                       "value": 0.71, "low": 0.67, "high": 0.75},
                      {"at": "2026-02-01T00:00:00+00:00", "version": 1, "metric": "roc_auc",
                       "value": 0.70, "low": 0.66, "high": 0.74},
                      {"at": "2026-03-01T00:00:00+00:00", "version": 1, "metric": "roc_auc",
                       "value": 0.69, "low": 0.65, "high": 0.73}],  # no labels yet: estimate only
        "concept_shifts": [{"at": "2026-02-01T00:00:00+00:00", "version": 1}],
        "promised": {1: 0.72}, "promotions": [], "retrains": []}
    html = performance_section(history)
    assert html.count('class="band"') == 1 and "estimated: band" in html
    assert html.count('class="pt"') == 2 + 3  # two realized windows, three estimates
    assert f">{ESTIMATED}</span>" in html and ">v1</span>" in html  # both in the legend
    assert "audit: probable concept shift (v1) 2026-02-01" in html
    # the band's polygon spans the estimate's three windows: six corners
    corners = re.search(r'<polygon class="band" points="([^"]+)"', html).group(1).split()
    assert len(corners) == 6


def test_a_window_with_only_an_estimate_still_draws_a_chart():
    html = performance_section({"metric": None, "points": [], "promised": {}, "promotions": [],
                                "retrains": [], "concept_shifts": [],
                                "estimates": [{"at": "2026-03-01T00:00:00+00:00", "version": 2,
                                               "metric": "rmse", "value": 4.1, "low": 3.8, "high": 4.4}]})
    assert "<svg" in html and "No monitoring window" not in html
    empty = performance_section({"metric": None, "points": [], "promised": {}, "promotions": [],
                                 "retrains": [], "estimates": [], "concept_shifts": []})
    assert "No monitoring window with labels or an estimate yet." in empty
