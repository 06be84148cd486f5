"""Walking parsed JSON/YAML: the path to the first value that matches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Path = tuple[str | int, ...]


def first_path(node: Any, match: Callable[[Any], bool], loc: Path = ()) -> Path | None:
    """The path (keys and list indices, after `loc`) of the first value, depth first, for which
    `match` is true; None when there is none."""
    if match(node):
        return loc
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found = first_path(child, match, (*loc, key))
        if found is not None:
            return found
    return None
