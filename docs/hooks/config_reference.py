"""The configuration reference, generated from the config models at each build (so it cannot
drift from the code): every field of a tabular and of a LoRA project's flywheel.yaml, with its
type, default, bounds and the comment above it in `flywheel/config.py`.

MkDocs runs this file as a hook (`hooks:` in mkdocs.yml); `render()` is what the tests read.
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from typing import Any

from pydantic import BaseModel

PAGE = "reference/configuration.md"


def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment block just above the field, or on its line, in config.py."""
    from flywheel import config

    source = inspect.getsource(config)
    lines = source.splitlines()
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, i = [], item.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    above.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                same = lines[item.lineno - 1].split("  # ", 1)
                text = " ".join(above) or (same[1].strip() if len(same) > 1 else "")
                found[(node.name, item.target.id)] = text
    return found


def _type(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(typing|datetime|pathlib|flywheel\.config)\.", "", text)
    text = re.sub(r"Annotated\[(.*?), FieldInfo\(.*?\)\]", r"\1", text)
    text = text.replace("NoneType", "None").replace("Literal", "one of ")
    return text.replace("|", "\\|")


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models inside an annotation (a model, a union of them, a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models(arg)
    return found


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for name, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥")):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(below)"
    return f"`{value!r}`" if value not in ({}, []) else "empty"


def fields_of(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(path, type, default, bounds, comment) of every field of `model`, nested models expanded."""
    comments = _comments()
    rows: list[tuple[str, str, str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        owner = next((c.__name__ for c in model.__mro__ if name in getattr(c, "__annotations__", {})),
                     model.__name__)
        comment = comments.get((owner, name), "")
        rows.append((path, _type(field.annotation), _default(field), _bounds(field), comment))
        nested = _models(field.annotation)
        if len(nested) == 1:
            rows += fields_of(nested[0], f"{path}.")
        elif nested:  # a choice of shapes, told apart by `kind`
            for option in nested:
                kind = option.model_fields.get("kind")
                label = typing.get_args(kind.annotation)[0] if kind else option.__name__
                rows += [(f"{path}[kind={label}].{r[0].removeprefix(path + '.')}", *r[1:])
                         for r in fields_of(option, f"{path}.") if not r[0].endswith(".kind")]
    return rows


def _row(path: str, kind: str, default: str, bounds: str, comment: str) -> str:
    note = comment.replace("|", "\\|")
    return f"| `{path}` | {kind} | {default} | {bounds} | {note} |"


HEAD = "| field | type | default | bounds | what it is |\n|---|---|---|---|---|"


def _sections(model: type[BaseModel], level: str) -> list[str]:
    """The top-level scalar fields in one table, then a section per nested model (its fields by
    their path below it), so that each part of the file has its own heading."""
    rows = fields_of(model)
    tops = [r for r in rows if "." not in r[0] and "[" not in r[0]]
    nested = {r[0] for r in tops if r[2] == "(below)" or _is_group(rows, r[0])}
    out = [HEAD + "\n" + "\n".join(_row(*r) for r in tops if r[0] not in nested)]
    for top in [r for r in tops if r[0] in nested]:
        out.append(f"{level} `{top[0]}`")
        below = [(r[0].removeprefix(top[0]).lstrip("."), *r[1:]) for r in rows
                 if r[0] != top[0] and (r[0].startswith(top[0] + ".") or r[0].startswith(top[0] + "["))]
        out.append(HEAD + "\n" + "\n".join(_row(*r) for r in below))
    return out


def _is_group(rows: list[tuple[str, str, str, str, str]], path: str) -> bool:
    return any(r[0].startswith(path + ".") or r[0].startswith(path + "[") for r in rows)


def render() -> str:
    """The whole page, as Markdown."""
    from flywheel.config import Config, LlmConfig

    return "\n\n".join([
        "# Configuration reference",
        "Generated from the config models each time the site is built: every field `flywheel.yaml` "
        "takes, with its type, default and bounds, and the note the code keeps beside it. A field "
        "may also be set from the environment: `FLYWHEEL_` + the path in capitals with `__` between "
        "levels (`FLYWHEEL_GATE__FLOOR=0.65`). [Configuration](../configuration.md) explains them "
        "by topic.",
        "## A tabular project (`kind: tabular`, the default)", *_sections(Config, "###"),
        "## A LoRA fine-tuning project (`kind: lora`)", *_sections(LlmConfig, "###"), ""])


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated page to the site."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


