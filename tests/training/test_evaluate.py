import math

from flywheel.config import GateConfig
from flywheel.training.evaluate import decide_gate, holdout_metrics

INPUTS = {"a": "number", "s": "string"}


def m(v: float, metric: str = "roc_auc") -> dict[str, float]:
    return {metric: v}


def test_without_champion_only_the_floor_applies():
    gate = GateConfig(floor=0.6, min_improvement=0.01)
    assert decide_gate(gate, m(0.61), None, INPUTS, None).passed
    refused = decide_gate(gate, m(0.59), None, INPUTS, None)
    assert not refused.passed and "floor" in refused.reasons[0] and "FAILS" in refused.reasons[0]


def test_challenger_must_beat_champion_by_the_minimum_improvement():
    gate = GateConfig(floor=0.5, min_improvement=0.01)
    assert decide_gate(gate, m(0.72), m(0.70), INPUTS, INPUTS).passed
    refused = decide_gate(gate, m(0.705), m(0.70), INPUTS, INPUTS)
    assert not refused.passed
    assert any("improvement" in r and "FAILS" in r for r in refused.reasons)


def test_lower_is_better_metrics_invert_floor_and_improvement():
    gate = GateConfig(metric="log_loss", floor=0.3, min_improvement=0.01)
    assert decide_gate(gate, m(0.20, "log_loss"), m(0.25, "log_loss"), INPUTS, INPUTS).passed
    assert not decide_gate(gate, m(0.31, "log_loss"), None, INPUTS, None).passed
    assert not decide_gate(gate, m(0.245, "log_loss"), m(0.25, "log_loss"), INPUTS, INPUTS).passed


def test_schema_incompatibility_with_the_champion_fails_the_gate():
    gate = GateConfig(floor=0.5)
    changed = {"a": "string", "s": "string", "new": "number"}
    d = decide_gate(gate, m(0.9), m(0.6), changed, INPUTS)
    assert not d.passed
    text = " ".join(d.reasons)
    assert "input 'a' changes type from number to string" in text
    assert "new required input 'new'" in text
    # dropping an input is fine: the champion's clients still send it
    assert decide_gate(gate, m(0.9), m(0.6), {"a": "number"}, INPUTS).passed


def test_undefined_metric_fails_with_a_reason():
    d = decide_gate(GateConfig(floor=0.5), m(float("nan")), None, INPUTS, None)
    assert not d.passed and "undefined" in d.reasons[0]


def test_holdout_metrics_on_known_values():
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    out = holdout_metrics(y, p)
    assert out["roc_auc"] == 0.75
    assert math.isclose(out["brier"], (0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert out["rows"] == 4 and out["positive_rate"] == 0.5


def test_floor_is_waived_only_when_the_champion_is_below_it_too():
    gate = GateConfig(floor=0.6, min_improvement=0.002)
    better = decide_gate(gate, m(0.59), m(0.58), INPUTS, INPUTS)
    assert better.passed and "waived" in better.reasons[0]
    not_better = decide_gate(gate, m(0.59), m(0.589), INPUTS, INPUTS)
    assert not not_better.passed  # waived floor, but the improvement rule still applies
    champion_fine = decide_gate(gate, m(0.59), m(0.61), INPUTS, INPUTS)
    assert not champion_fine.passed and "FAILS" in champion_fine.reasons[0]
