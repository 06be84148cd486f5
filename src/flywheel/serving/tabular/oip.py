"""The Open Inference Protocol (KServe v2) over the served model: request tensors to records,
and the model's metadata and response tensors."""

from __future__ import annotations

from typing import Any

from flywheel.serving.http.errors import FieldError, RequestInvalid
from flywheel.serving.tabular.runtime import LoadedModel

_DATATYPE = {"number": "FP64", "string": "BYTES"}
MAX_SHAPE_DIMS = 8  # a column is [n] or [n, 1]; more dimensions than this is never a table
MAX_SHAPE_DIM = 2**31  # no body the server reads holds more values than this


def oip_records(body: Any, model: LoadedModel) -> list[dict[str, Any]]:
    """Open Inference Protocol columns (one tensor per input field) as validated records."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestInvalid([FieldError(("body", "inputs"), "a non-empty list of input tensors "
                                         "({name, shape, datatype, data}) is required", "missing")])
    columns: dict[str, list[Any]] = {}
    errors: list[FieldError] = []
    for i, tensor in enumerate(body["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) \
                or not isinstance(tensor.get("data"), list):
            errors.append(FieldError(("body", "inputs", i), "each input needs a string 'name' and a "
                                     "'data' list", "type_error"))
            continue
        if tensor["name"] in columns:
            errors.append(FieldError(("body", "inputs", i), f"input '{tensor['name']}' is given twice",
                                     "duplicate"))
            continue
        data = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in tensor["data"]]
        declared = _declared_errors(tensor, len(data), model.spec.input_types.get(tensor["name"]),
                                    ("body", "inputs", i))
        errors.extend(declared)
        columns[tensor["name"]] = data
    if errors:
        raise RequestInvalid(errors)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise RequestInvalid([FieldError(("body", "inputs"), "every input needs the same, non-zero "
                                         "number of values", "shape_mismatch")])
    n = lengths.pop()
    records = [{name: values[i] for name, values in columns.items()} for i in range(n)]
    try:
        return model.validator.records(records)
    except RequestInvalid as exc:
        # (body, i, field) -> (body, inputs, field, i): point at the tensor and the element
        raise RequestInvalid([
            FieldError(("body", "inputs", e.loc[2], e.loc[1]) if len(e.loc) == 3 else e.loc,
                       e.msg, e.type) for e in exc.errors]) from None


# What each declared datatype may carry: numbers for the FP and INT types, text for BYTES.
_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
            "UINT64"}


def _declared_errors(tensor: dict[str, Any], count: int, input_type: str | None,
                     loc: tuple[str | int, ...]) -> list[FieldError]:
    """The tensor's `shape` must hold exactly its values, and its `datatype` must be the kind of
    the model's input (a number type for a numeric input, BYTES for a text one or for `meta`)."""
    errors = []
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not shape or len(shape) > MAX_SHAPE_DIMS \
            or not all(type(d) is int and d >= 0 for d in shape):
        errors.append(FieldError((*loc, "shape"), f"a list of at most {MAX_SHAPE_DIMS} non-negative "
                                 "integers, e.g. [3] or [3, 1]", "type_error"))
    elif any(d > MAX_SHAPE_DIM for d in shape):
        # checked before multiplying: 47,000 huge dimensions once took 7 s on the event loop
        errors.append(FieldError((*loc, "shape"), f"each dimension at most {MAX_SHAPE_DIM:,}",
                                 "shape_mismatch"))
    else:
        product = 1
        for d in shape:
            product *= d
        if product != count:
            errors.append(FieldError((*loc, "shape"), f"shape {shape} holds {product} values but data "
                                     f"has {count}", "shape_mismatch"))
    wanted = "number" if datatype in _NUMERIC else "string" if datatype == "BYTES" else None
    if wanted is None:
        errors.append(FieldError((*loc, "datatype"), "one of " + ", ".join(sorted(_NUMERIC | {"BYTES"})),
                                 "type_error"))
    elif input_type is not None and wanted != input_type:
        errors.append(FieldError((*loc, "datatype"), f"'{tensor['name']}' is a {input_type} input: "
                                 f"declare {_DATATYPE[input_type]}, not {datatype}", "type_error"))
    return errors


def oip_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "name": model.name, "versions": [str(model.version)], "platform": "onnxruntime",
        "inputs": [{"name": n, "datatype": _DATATYPE[t], "shape": [-1]}
                   for n, t in model.spec.input_types.items()],
        "outputs": model.answers.oip_declared(),
    }


def oip_response(model: LoadedModel, body: dict[str, Any], request_id: str, ids: list[str],
                 fields: list[tuple[Any, ...]]) -> dict[str, Any]:
    answers = model.answers
    return {
        "model_name": model.name, "model_version": str(model.version),
        "id": body.get("id") if isinstance(body.get("id"), str) else request_id,
        "parameters": {"request_id": request_id, "record_ids": ids, **answers.top_level},
        "outputs": answers.oip_outputs(fields),
    }
