"""The exported model's format, and the one ONNX Runtime session builder.

Every exported model takes one float32 input named `input` (the feature vector, NaN for missing,
category codes as numbers) and has exactly one output, `probability`: P(positive) of shape (n,).
Training's parity check and the server build their sessions here, with the same options, so the
check measures what will be served.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ONNX_INPUT = "input"
ONNX_OUTPUT = "probability"
BOTH_CLASSES = "probabilities"  # what the converters produce: (n, 2)


def new_session(onnx_bytes: bytes) -> Any:
    """An ONNX Runtime session as serving runs it: one thread, sequential, quiet."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # one thread per worker: workers, not threads, use the cores
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def session_predict(session: Any, X: np.ndarray) -> np.ndarray:
    """P(positive) for a feature matrix, as float64."""
    out = session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(X, dtype=np.float32)})[0]
    return np.asarray(out).astype(np.float64)


def onnx_predict(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """P(positive) from an exported model, in a session built as serving builds it."""
    return session_predict(new_session(onnx_bytes), X)


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
