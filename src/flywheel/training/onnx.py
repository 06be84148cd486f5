"""The exported model's format, and the one ONNX Runtime session builder.

Every exported model takes one float32 input named `input` (the feature vector, NaN for missing,
category codes as numbers) and has exactly one output, named after what it holds: `probability`,
P(positive) of shape (n,), for a binary model; `value`, shape (n,), for a regression; and
`probabilities`, shape (n, classes), for a multiclass model (the classes in the order of the
feature spec's `classes`). Training's parity check and the server build their sessions here, with
the same options, so the check measures what will be served.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ONNX_INPUT = "input"
ONNX_OUTPUT = "probability"
BOTH_CLASSES = "probabilities"  # what the converters produce: (n, 2), or (n, classes)
VALUE_OUTPUT = "value"
TASK_OUTPUT = {"binary": ONNX_OUTPUT, "regression": VALUE_OUTPUT, "multiclass": BOTH_CLASSES}


def new_session(onnx_bytes: bytes) -> Any:
    """An ONNX Runtime session as serving runs it: one thread, sequential, quiet."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # one thread per worker: workers, not threads, use the cores
    opts.inter_op_num_threads = 1
    # No busy-waiting between runs: on a shared machine spinning threads take CPU from real work.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def session_predict(session: Any, X: np.ndarray) -> np.ndarray:
    """The model's one output for a feature matrix, as float64."""
    out = session.run(None, {ONNX_INPUT: np.ascontiguousarray(X, dtype=np.float32)})[0]
    return np.asarray(out).astype(np.float64)


def onnx_predict(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """The output of an exported model, in a session built as serving builds it."""
    return session_predict(new_session(onnx_bytes), X)


def task_output(onnx_model: Any, task: str) -> bytes:
    """The converter's graph with the one output of the task (see the module's docstring)."""
    if task == "binary":
        return positive_class_output(onnx_model)
    if task == "multiclass":
        return _only_output(onnx_model, BOTH_CLASSES, None)
    return _only_output(onnx_model, _first_output(onnx_model), [-1])


def _first_output(onnx_model: Any) -> str:
    return str(onnx_model.graph.output[0].name)


def _only_output(onnx_model: Any, source: str, reshape: list[int] | None) -> bytes:
    """Keep one output: `source` as it is (multiclass probabilities), or flattened to (n,) and
    named `value` (a regression's (n, 1) output)."""
    import onnx
    from onnx import TensorProto, helper

    graph = onnx_model.graph
    names = [o.name for o in graph.output]
    if source not in names:
        raise RuntimeError(f"ONNX export has outputs {names}, expected one named '{source}'")
    kept = next(o for o in graph.output if o.name == source)
    del graph.output[:]
    if reshape is None:
        width = kept.type.tensor_type.shape.dim[1].dim_value if len(
            kept.type.tensor_type.shape.dim) == 2 else None
        graph.output.append(helper.make_tensor_value_info(source, TensorProto.FLOAT, [None, width]))
    else:
        graph.node.extend([
            helper.make_node("Constant", [], ["flat_shape"],
                             value=helper.make_tensor("flat_shape", TensorProto.INT64, [1], reshape)),
            helper.make_node("Reshape", [source, "flat_shape"], [VALUE_OUTPUT]),
        ])
        graph.output.append(helper.make_tensor_value_info(VALUE_OUTPUT, TensorProto.FLOAT, [None]))
    if not any(op.domain in ("", "ai.onnx") for op in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("", 15))
    onnx.checker.check_model(onnx_model)
    return bytes(onnx_model.SerializeToString())


def positive_class_output(onnx_model: Any) -> bytes:
    """Replace the graph's outputs with one: `probability` = column 1 of the (n, 2) probabilities."""
    import onnx
    from onnx import TensorProto, helper

    graph = onnx_model.graph
    names = [o.name for o in graph.output]
    if BOTH_CLASSES not in names:
        raise RuntimeError(f"ONNX export has outputs {names}, expected one named '{BOTH_CLASSES}'")
    graph.node.extend([
        helper.make_node("Constant", [], ["positive_class"],
                         value=helper.make_tensor("positive_class", TensorProto.INT64, [], [1])),
        helper.make_node("Gather", [BOTH_CLASSES, "positive_class"], [ONNX_OUTPUT], axis=1),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [None]))
    if not any(op.domain in ("", "ai.onnx") for op in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("", 15))
    onnx.checker.check_model(onnx_model)
    return onnx_model.SerializeToString()
