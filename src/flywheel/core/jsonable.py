"""One rule for every result printed or sent as JSON (`--json`, the API's results, run records).

A dataclass becomes an object of its fields (a field's `metadata={"json": NAME}` renames it, `None`
as the name leaves it out) plus the properties its class lists in `JSON_PROPERTIES`; a pydantic model
its `model_dump(mode="json")`; dates and times ISO 8601; paths strings; NaN and infinities `null`;
NumPy scalars their Python value. Anything else is a `TypeError`, never a silent `str()`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import PurePath
from typing import Any

JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]


def jsonable(value: Any) -> JSON:
    """`value` as plain JSON data, by the rule above."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return _scalar(value)


def _scalar(value: Any) -> JSON:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    dump = getattr(value, "model_dump", None)  # pydantic
    if callable(dump):
        return jsonable(dump(mode="json"))
    item = getattr(value, "item", None)  # a NumPy scalar
    if callable(item) and getattr(value, "shape", None) == ():
        return jsonable(item())
    raise TypeError(f"no JSON form for {type(value).__name__}: give it a dataclass or pydantic type")


def _dataclass(value: Any) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for f in dataclasses.fields(value):
        name = f.metadata.get("json", f.name)
        if name is not None:
            out[name] = jsonable(getattr(value, f.name))
    for name in getattr(type(value), "JSON_PROPERTIES", ()):
        out[name] = jsonable(getattr(value, name))
    return out


def dumps(value: Any, indent: int | None = 2) -> str:
    """`value` as JSON text (`jsonable`, then `json.dumps` with NaN refused)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False, ensure_ascii=False)


def leave_out() -> dict[str, Any]:
    """A field's metadata that keeps it out of the JSON form (frames, open handles)."""
    return {"json": None}
