"""The Python API (`flywheel.lifecycle`) gives the same objects whatever was imported before."""

from __future__ import annotations

import importlib
import pkgutil
import types

import flywheel.lifecycle as lifecycle


def test_no_public_name_is_shadowed_by_a_submodule_of_the_same_name():
    # Importing a submodule sets it as an attribute of the package: a public function named like a
    # submodule would then be that module for whoever imports it later.
    for module in pkgutil.iter_modules(lifecycle.__path__):
        importlib.import_module(f"flywheel.lifecycle.{module.name}")
    for name in lifecycle.__all__:
        assert not isinstance(getattr(lifecycle, name), types.ModuleType), name
        assert callable(getattr(lifecycle, name)), name
