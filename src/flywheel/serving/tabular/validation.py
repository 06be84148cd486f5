"""Request validation compiled from a model's input schema: field-level errors, no per-row objects.

A record is a JSON object with exactly the model's input fields (null only where the training
data had missing values) plus an optional `meta` object that is logged, never used as input.


Labels posted to `/v1/feedback` are checked here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC
from typing import Any

from flywheel.core.times import EVENT_TIME, EventTimes
from flywheel.data.features import FeatureSpec
from flywheel.serving.http.errors import FieldError, RequestInvalid

META = "meta"
MAX_META_KEYS = 50
# Bounds on what `meta` may nest: the log writes it back as JSON, and orjson writes at most 254
# levels (it reads 1,024), so a deeper object would be accepted and never stored.
MAX_META_DEPTH = 8
MAX_META_VALUES = 1_000
META_RULE = (f"meta must be an object of at most {MAX_META_KEYS} keys, nested at most "
             f"{MAX_META_DEPTH} levels deep, with at most {MAX_META_VALUES:,} values in all")
FLOAT32_MAX = 3.4028234663852886e38  # the models compute in float32: a larger number becomes inf


class RecordValidator:
    """Checks records against one model's inputs; built once per loaded model."""

    def __init__(self, spec: FeatureSpec, max_records: int, max_string_length: int,
                 times: EventTimes | None = None):
        self.times = times or EventTimes()
        self.types = dict(spec.input_types)
        self.nullable = frozenset(spec.nullable_inputs)
        self.required = frozenset(self.types)
        self.allowed = self.required | {META}
        self.max_records = max_records
        self.max_string_length = max_string_length
        names = sorted(self.types)
        self.unknown_msg = ("unknown field; the model's inputs are " + ", ".join(names) if len(names) <= 20
                            else f"unknown field; the model's {len(names)} inputs are in /openapi.json") \
            + "; put other data under 'meta'"

    def records(self, body: Any) -> list[dict[str, Any]]:
        """The body (one record or a list of them) as a list of valid records, or RequestInvalid."""
        if isinstance(body, dict):
            items, prefix = [body], ("body",)
        elif isinstance(body, list):
            if not body:
                raise RequestInvalid([FieldError(("body",), "send at least one record", "too_short")])
            if len(body) > self.max_records:
                raise RequestInvalid([FieldError(
                    ("body",), f"at most {self.max_records} records per request", "too_long")])
            items, prefix = body, None
        else:
            raise RequestInvalid([FieldError(
                ("body",), "send a JSON object (one record) or a list of records", "type_error")])
        errors: list[FieldError] = []
        for i, record in enumerate(items):
            errors.extend(self.record_errors(record, prefix or ("body", i)))
        if errors:
            raise RequestInvalid(errors)
        return items

    def record_errors(self, record: Any, loc: tuple[str | int, ...]) -> list[FieldError]:
        if not isinstance(record, dict):
            return [FieldError(loc, "a record must be a JSON object", "type_error")]
        keys = record.keys()
        if keys == self.required or keys == self.allowed and _meta_ok(record.get(META)):
            # Fast path: the right fields; check only values.
            errors = []
            for name, kind in self.types.items():
                err = self.value_error(name, kind, record[name], loc)
                if err is not None:
                    errors.append(err)
            if META in record and EVENT_TIME in record[META]:
                errors.extend(self.event_time_errors(record[META], loc))
            return errors
        return self.field_errors(record, loc)

    def field_errors(self, record: dict[str, Any], loc: tuple[str | int, ...]) -> list[FieldError]:
        """Every problem of a record whose fields are not exactly the model's (the slow path)."""
        errors = [FieldError((*loc, name), "field required", "missing")
                  for name in self.types if name not in record]
        errors += [FieldError((*loc, key), self.unknown_msg, "extra_forbidden")
                   for key in record if key not in self.allowed]
        if META in record and not _meta_ok(record[META]):
            errors.append(FieldError((*loc, META), META_RULE, "type_error"))
        elif META in record and EVENT_TIME in record[META]:
            errors.extend(self.event_time_errors(record[META], loc))
        for name, kind in self.types.items():
            if name in record:
                err = self.value_error(name, kind, record[name], loc)
                if err is not None:
                    errors.append(err)
        return errors

    def event_time_errors(self, meta: dict[str, Any], loc: tuple[str | int, ...]) -> list[FieldError]:
        """`meta.event_time` read in the project's time unit and bounded; rewritten as ISO 8601 so
        that every reader of the log reads the same time."""
        try:
            meta[EVENT_TIME] = self.times.iso(meta[EVENT_TIME])
        except ValueError as exc:
            return [FieldError((*loc, META, EVENT_TIME), str(exc), "time_error")]
        return []

    def value_error(self, name: str, kind: str, value: Any, loc: tuple[str | int, ...]) -> FieldError | None:
        if value is None:
            if name in self.nullable:
                return None
            return FieldError((*loc, name), "may not be null", "null_forbidden")
        if kind == "number":
            if type(value) is float or type(value) is int or type(value) is bool:
                if -FLOAT32_MAX <= value <= FLOAT32_MAX:  # true/false are 1/0, as in a batch file
                    return None
                if type(value) is float and not math.isfinite(value):
                    return FieldError((*loc, name), "must be a finite number (no NaN or infinity)",
                                      "finite_number")
                return FieldError((*loc, name), f"out of range: at most {FLOAT32_MAX:.4g} in size "
                                  "(the model computes in 32-bit floats)", "out_of_range")
            return FieldError((*loc, name), f"must be a number, not {_json_type(value)}", "type_error")
        if type(value) is str:
            if len(value) <= self.max_string_length:
                return None
            return FieldError((*loc, name), f"at most {self.max_string_length} characters", "too_long")
        return FieldError((*loc, name), f"must be a string, not {_json_type(value)}", "type_error")


def _meta_ok(meta: Any) -> bool:
    if not isinstance(meta, dict) or len(meta) > MAX_META_KEYS:
        return False
    values = 0
    level: list[Any] = [meta]
    for _depth in range(MAX_META_DEPTH):  # breadth first, one level per turn
        inner: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            values += len(children)
            inner.extend(c for c in children if isinstance(c, dict | list) and c)
        if values > MAX_META_VALUES:
            return False
        if not inner:
            return True
        level = inner
    return False


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


MAX_FEEDBACK_LABELS = 10_000


def feedback_labels(body: Any, task: str = "binary", classes: list[str] | None = None,
                    times: EventTimes | None = None) -> list[dict[str, Any]]:
    """{"labels": [{"record_id", "label", "observed_at"?}]}, validated; the label is 0/1 or
    true/false (binary), a finite number (regression) or one of `classes` (multiclass; any
    non-empty string when `classes` is empty)."""
    labels = body.get("labels") if isinstance(body, dict) else None
    if not isinstance(labels, list) or not labels:
        raise RequestInvalid([FieldError(("body", "labels"), "a non-empty list of labels is required",
                                         "missing")])
    if len(labels) > MAX_FEEDBACK_LABELS:
        raise RequestInvalid([FieldError(("body", "labels"), f"at most {MAX_FEEDBACK_LABELS} labels",
                                         "too_long")])
    errors: list[FieldError] = []
    times = times or EventTimes()
    out = [_feedback_label(item, ("body", "labels", i), errors, task, classes or [], times)
           for i, item in enumerate(labels)]
    if errors:
        raise RequestInvalid(errors)
    return [label for label in out if label is not None]


def refuse_unissued(labels: list[dict[str, Any]], issued: Callable[[str], bool]) -> None:
    """RequestInvalid naming every label whose record id this deployment did not issue."""
    errors = [FieldError(("body", "labels", i, "record_id"),
                         "not a record id this service issued (use the record_id of a prediction)",
                         "unknown_record")
              for i, item in enumerate(labels) if not issued(item["record_id"])]
    if errors:
        raise RequestInvalid(errors)


def _feedback_label(item: Any, loc: tuple[str | int, ...], errors: list[FieldError], task: str,
                    classes: list[str], times: EventTimes) -> dict[str, Any] | None:
    """One label, its problems appended to `errors`."""
    if not isinstance(item, dict):
        errors.append(FieldError(loc, "a label must be an object", "type_error"))
        return None
    extra = set(item) - {"record_id", "label", "observed_at"}
    if extra:
        errors.append(FieldError((*loc, sorted(extra)[0]), "unknown field", "extra_forbidden"))
    rid = item.get("record_id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 100:
        errors.append(FieldError((*loc, "record_id"), "a string of 1 to 100 characters", "type_error"))
    label = _task_label(item.get("label"), (*loc, "label"), errors, task, classes)
    observed = item.get("observed_at")
    parsed = None
    if observed is not None:
        if not isinstance(observed, str):
            errors.append(FieldError((*loc, "observed_at"), "an ISO 8601 date-time", "type_error"))
        else:
            try:  # naive UTC, within serving.times: a far-future time broke `log export`
                parsed = times.read(observed).replace(tzinfo=UTC)
            except ValueError as exc:
                errors.append(FieldError((*loc, "observed_at"), str(exc), "time_error"))
    return {"record_id": rid, "observed_at": parsed, "label": None, "value": None, "label_text": None,
            **label}


def _task_label(label: Any, loc: tuple[str | int, ...], errors: list[FieldError], task: str,
                classes: list[str]) -> dict[str, Any]:
    """The label as the feedback table's column for the task: label, value or label_text."""
    if task == "regression":
        if isinstance(label, bool) or not isinstance(label, int | float) or not math.isfinite(label):
            errors.append(FieldError(loc, "must be a finite number (the true value)", "type_error"))
            return {}
        return {"value": float(label)}
    if task == "multiclass":
        if not isinstance(label, str) or not 0 < len(label) <= 200:
            errors.append(FieldError(loc, "must be the true class's name (a string)", "type_error"))
        elif classes and label not in classes:
            errors.append(FieldError(loc, "not one of the model's classes: " + ", ".join(classes[:20]),
                                     "unknown_class"))
        else:
            return {"label_text": label}
        return {}
    if label not in (0, 1) or isinstance(label, float):
        errors.append(FieldError(loc, "must be 0, 1, true or false", "type_error"))
        return {}
    return {"label": int(label)}
