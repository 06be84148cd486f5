"""Models over the raw input columns (a scikit-learn `Pipeline` with its own preprocessing, an ONNX
file whose inputs name the columns), made servable like every other version.

Such a model gets a feature spec of its own: one feature per input column it reads (a number as
it is, a text column as a category whose vocabulary is every value the project's window holds), so
the server validates exactly its declared inputs and monitoring watches them. Its ONNX export is
the model's own graph behind an adapter that takes Flywheel's feature vector and hands each input
back as the model declared it: the number cast to its type, the text looked up from its code. A
text value outside the window's values, or a missing one, reaches the model as `__unknown__` (what
a `OneHotEncoder(handle_unknown="ignore")` ignores); the parity check feeds the original model the
same values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import CategoryFeature, NumericFeature
from flywheel.core.errors import FlywheelError
from flywheel.data import features as feats
from flywheel.lifecycle.features import PreparedData
from flywheel.training.onnx import ONNX_INPUT

UNKNOWN = "__unknown__"
MAX_TEXT_VALUES = 10_000
_ONNX_TYPES = {"tensor(float)": 1, "tensor(double)": 11, "tensor(int64)": 7, "tensor(int32)": 6,
               "tensor(string)": 8}


class RawInputError(FlywheelError):
    """The model's inputs cannot be fed from the project's table; the message says why."""


def raw_prepared(prepared: PreparedData, columns: list[str]) -> PreparedData:
    """The project's rows (same snapshot, split and target) as the inputs of a model that reads
    `columns` of the table."""
    frame = prepared.frame
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RawInputError(f"the model reads column(s) {', '.join(missing)} that the table "
                            f"'{prepared.snapshot.path.name if prepared.snapshot else 'rows'}' does "
                            f"not have; it has: {', '.join(map(str, frame.columns))}")
    features: list[Any] = []
    vocabularies: dict[str, list[str]] = {}
    for c in columns:
        if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]):
            features.append(NumericFeature(kind="numeric", name=c, column=c))
            continue
        values = frame[c].dropna().astype(str).value_counts()
        if len(values) > MAX_TEXT_VALUES:
            raise RawInputError(f"column '{c}' holds {len(values):,} distinct texts: more than "
                                f"{MAX_TEXT_VALUES:,}, it is free text, not an input this adapter feeds")
        features.append(CategoryFeature(kind="category", name=c, column=c,
                                        max_categories=MAX_TEXT_VALUES, min_count=1))
        vocabularies[c] = [str(v) for v in values.index]
    base = feats.fit_spec(features, frame.iloc[prepared.split.train])
    spec = dataclasses.replace(base, vocabularies=vocabularies, task=prepared.spec.task,
                               classes=prepared.spec.classes,
                               nullable_inputs=[c for c in columns if frame[c].isna().any()])
    return PreparedData(prepared.snapshot, frame, spec, feats.build_matrix(spec, frame), prepared.y,
                        prepared.split)


def raw_frame(spec: feats.FeatureSpec, X: np.ndarray) -> pd.DataFrame:
    """The inputs as the adapter hands them to the model: numbers as they are, texts from their
    codes (`__unknown__` for the other code)."""
    out: dict[str, Any] = {}
    for i, f in enumerate(spec.features):
        if isinstance(f, CategoryFeature):
            vocab = np.asarray([*spec.vocabularies.get(f.name, []), UNKNOWN], dtype=object)
            out[f.column] = vocab[np.nan_to_num(X[:, i], nan=len(vocab) - 1).astype(np.int64)]
        else:
            out[f.name] = X[:, i]
    return pd.DataFrame(out)


def with_adapter(model: Any, spec: feats.FeatureSpec) -> Any:
    """The model's graph fed from Flywheel's feature vector `input` (see the module's docstring)."""
    from onnx import TensorProto, helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    declared = {i.name: i for i in graph.input if i.name not in initializers}
    index = {f.name: i for i, f in enumerate(spec.features)}
    nodes = []
    for name, value in declared.items():
        if name not in index:
            raise RawInputError(f"the model's input '{name}' is not a column it was matched with")
        elem = value.type.tensor_type.elem_type
        rank = len(value.type.tensor_type.shape.dim)
        p = f"flywheel_adapter_{index[name]}"
        nodes += [helper.make_node("Constant", [], [f"{p}_at"], value=helper.make_tensor(
                      f"{p}_at", TensorProto.INT64, [1], [index[name]])),
                  helper.make_node("Gather", [ONNX_INPUT, f"{p}_at"], [f"{p}_col"], axis=1)]
        last = f"{p}_col"
        if elem == TensorProto.STRING:
            vocab = spec.vocabularies.get(name, [])
            nodes += [helper.make_node("Cast", [last], [f"{p}_code"], to=TensorProto.INT64),
                      helper.make_node("CategoryMapper", [f"{p}_code"], [f"{p}_text"], domain="ai.onnx.ml",
                                       cats_int64s=list(range(len(vocab))), cats_strings=vocab,
                                       default_string=UNKNOWN)]
            last = f"{p}_text"
        elif elem != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [last], [f"{p}_cast"], to=elem))
            last = f"{p}_cast"
        if rank == 1:
            nodes += [helper.make_node("Constant", [], [f"{p}_flat"], value=helper.make_tensor(
                          f"{p}_flat", TensorProto.INT64, [1], [-1])),
                      helper.make_node("Reshape", [last, f"{p}_flat"], [f"{p}_1d"])]
            last = f"{p}_1d"
        nodes.append(helper.make_node("Identity", [last], [name]))
    kept = [n for n in graph.node]
    del graph.node[:]
    graph.node.extend([*nodes, *kept])
    others = [i for i in graph.input if i.name in initializers]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT,
                                                      [None, len(spec.features)]), *others])
    domains = {op.domain for op in model.opset_import}
    if "ai.onnx.ml" not in domains:
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    return model


def declared_inputs(session: Any) -> list[tuple[str, str]]:
    """An ONNX session's inputs as (name, ONNX type), refusing types the adapter cannot feed."""
    out = []
    for i in session.get_inputs():
        if i.type not in _ONNX_TYPES:
            raise RawInputError(f"the model's input '{i.name}' is a {i.type}; the adapter feeds "
                                "float, double, int32, int64 and string tensors")
        out.append((i.name, i.type))
    return out


def session_feed(inputs: list[tuple[str, str]], ranks: dict[str, int], frame: pd.DataFrame
                 ) -> dict[str, np.ndarray]:
    """`frame` as an ONNX session's named inputs."""
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(string)": object}
    feed = {}
    for name, kind in inputs:
        values = frame[name].to_numpy()
        if kind != "tensor(string)":
            values = values.astype(np.float64).astype(dtypes[kind])
        else:
            values = values.astype(object)
        feed[name] = values if ranks.get(name, 2) == 1 else values.reshape(-1, 1)
    return feed
