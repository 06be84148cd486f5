import math

import numpy as np
import pandas as pd
import pytest
from pydantic import TypeAdapter

from flywheel.config import Feature
from flywheel.data.features import FeatureSpec, build_matrix, fit_spec, row_function, to_sql
from tests.conftest import example_config

FEATURES = TypeAdapter(list[Feature])


def records(frame: pd.DataFrame, cols: list[str]) -> list[dict]:
    return frame[cols].astype(object).where(frame[cols].notna(), None).to_dict("records")


def assert_parity(spec: FeatureSpec, frame: pd.DataFrame) -> np.ndarray:
    batch = build_matrix(spec, frame)
    fn = row_function(spec)
    rows = np.array([fn(r) for r in records(frame, spec.input_columns)], dtype=np.float32)
    assert batch.shape == rows.shape == (len(frame), len(spec.features))
    assert np.array_equal(batch, rows, equal_nan=True)
    return batch


def test_example_features_batch_and_row_agree_on_the_sba_sample(sba_sample):
    features = FEATURES.validate_python(example_config()["features"])
    spec = fit_spec(features, sba_sample.iloc[:20000])
    batch = assert_parity(spec, sba_sample)
    assert not np.isnan(batch[:, spec.names.index("state")]).any()  # categories never missing


EDGE_FEATURES = FEATURES.validate_python([
    {"name": "n", "kind": "numeric", "column": "a"},
    {"name": "r", "kind": "ratio", "numerator": "a", "denominator": "b"},
    {"name": "f_eq", "kind": "flag", "column": "a", "op": "==", "value": 2},
    {"name": "f_ge", "kind": "flag", "column": "a", "op": ">=", "value": 2.5},
    {"name": "f_in", "kind": "flag", "column": "s", "op": "in", "value": ["x", "it's"]},
    {"name": "f_col", "kind": "flag", "column": "s", "op": "!=", "other": "t"},
    {"name": "bk", "kind": "bucket", "column": "a", "edges": [1, 2, 3]},
    {"name": "c", "kind": "category", "column": "s", "min_count": 1},
    {"name": "c_int", "kind": "category", "column": "k", "min_count": 1},
    {"name": "c_pre", "kind": "category", "column": "s", "prefix": 1, "min_count": 1},
])


def edge_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "a": [1.0, 2.0, 3.0, None, 0.0, 2.5],
        "b": [2.0, 0.0, None, 1.0, 4.0, 5.0],
        "s": ["x", "it's", None, "y", "x", "zz"],
        "t": ["x", "x", "y", None, "q", "zz"],
        "k": [1.0, 2.0, None, 1.0, 3.0, 2.0],  # a nullable integer column arrives as float
    })


def test_every_kind_agrees_on_nulls_zero_denominators_edges_and_quotes():
    frame = edge_frame()
    spec = fit_spec(EDGE_FEATURES, frame)
    batch = assert_parity(spec, frame)
    col = {n: batch[:, i] for i, n in enumerate(spec.names)}
    assert math.isnan(col["r"][1]) and math.isnan(col["r"][2])      # /0 and /NULL are missing
    assert list(col["bk"][:3]) == [1.0, 2.0, 3.0]                    # an edge goes to the bucket above
    assert list(col["f_in"][:2]) == [1.0, 1.0]                       # quotes survive SQL escaping
    assert spec.vocabularies["c_int"] == ["1", "2", "3"]             # 1.0 is category "1"


def test_integer_and_float_inputs_map_to_the_same_category():
    spec = fit_spec(EDGE_FEATURES, edge_frame())
    fn = row_function(spec)
    base = {"a": 1, "b": 2, "s": "x", "t": "x"}
    i = spec.names.index("c_int")
    assert fn({**base, "k": 2})[i] == fn({**base, "k": 2.0})[i] != fn({**base, "k": 7})[i]


def test_unseen_and_missing_categories_get_the_other_code():
    spec = fit_spec(EDGE_FEATURES, edge_frame())
    fn = row_function(spec)
    i = spec.names.index("c")
    other = len(spec.vocabularies["c"])
    assert fn({"s": "never-seen"})[i] == other
    assert fn({"s": None})[i] == other
    frame = pd.DataFrame({c: [None] for c in ["a", "b", "t", "k"]} | {"s": ["never-seen"]})
    assert build_matrix(spec, frame)[0, i] == other


def test_vocabulary_keeps_the_most_frequent_and_respects_min_count():
    features = FEATURES.validate_python(
        [{"name": "c", "kind": "category", "column": "s", "max_categories": 2, "min_count": 2}])
    frame = pd.DataFrame({"s": ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]})
    assert fit_spec(features, frame).vocabularies["c"] == ["a", "b"]


def test_spec_round_trips_through_json_and_hash_is_stable():
    spec = fit_spec(EDGE_FEATURES, edge_frame())
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec
    assert again.sha256() == spec.sha256()
    assert to_sql(again, "t") == to_sql(spec, "t")


def test_sql_is_plain_select_with_every_feature_as_double():
    spec = fit_spec(EDGE_FEATURES, edge_frame())
    sql = to_sql(spec, "rows", passthrough=["s"])
    assert sql.startswith("SELECT ") and sql.endswith(' "s" FROM rows')
    assert sql.count("AS DOUBLE) AS") == len(spec.features)


@pytest.mark.parametrize("value", [float("inf"), -1e300])
def test_extreme_numbers_agree(value):
    spec = fit_spec(EDGE_FEATURES, edge_frame())
    frame = edge_frame()
    frame.loc[0, "a"] = value
    assert_parity(spec, frame)
