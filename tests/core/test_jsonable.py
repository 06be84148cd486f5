"""The one JSON rule: dataclasses by their fields (renamed, left out, properties added), dates,
paths, NaN as null, NumPy scalars, pydantic models; anything else refused, never str()."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydantic import BaseModel

from flywheel.core.jsonable import dumps, jsonable, leave_out


@dataclass(frozen=True)
class Inner:
    start: date = field(metadata={"json": "from"})
    score: float


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    path: Path
    frame: object = field(metadata=leave_out())
    values: tuple[float, ...] = ()
    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("double",)

    @property
    def double(self) -> int:
        return 2 * len(self.name)


class Settings(BaseModel):
    when: datetime
    size: int


def test_a_dataclass_is_its_fields_renamed_and_left_out_plus_its_listed_properties():
    value = Outer("ab", Inner(date(2021, 1, 1), float("nan")), Path("/tmp/x"), frame=object(),
                  values=(np.float32(0.5), math.inf))
    assert jsonable(value) == {"name": "ab", "inner": {"from": "2021-01-01", "score": None},
                               "path": "/tmp/x", "values": [0.5, None], "double": 4}


def test_pydantic_models_numpy_scalars_and_mappings_follow_the_same_rule():
    when = datetime(2026, 12, 6, 1, 2, 3, tzinfo=UTC)
    assert jsonable({"s": Settings(when=when, size=3), 1: np.int64(7), "ok": np.bool_(True)}) == {
        "s": {"when": "2026-12-06T01:02:03Z", "size": 3}, "1": 7, "ok": True}


def test_an_object_with_no_json_form_is_refused_not_turned_into_text():
    with pytest.raises(TypeError, match="no JSON form for object"):
        jsonable({"x": object()})
    with pytest.raises(TypeError, match="ndarray"):
        jsonable(np.zeros(3))


def test_dumps_writes_strict_json():
    text = dumps({"a": float("nan"), "b": [date(2020, 2, 29)]})
    assert json.loads(text) == {"a": None, "b": ["2020-02-29"]}
    assert "NaN" not in text
