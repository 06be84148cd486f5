"""The documentation site: it builds with `mkdocs build --strict` (offline), every module of
src/ is on the architecture page, the configuration reference covers every field of the config
models and the hand-written configuration page names none that does not exist, and pages stay
short enough to read."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from flywheel import api
from tests.conftest import REPO

DOCS = REPO / "docs"
MAX_PAGE_LINES = 400


def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_strict_with_the_api_and_the_configuration_reference(site):
    api_page = (site / "python-api" / "index.html").read_text()
    documented = [name for name in api.__all__ if inspect.isfunction(getattr(api, name))]
    missing = [name for name in documented if f'id="flywheel.api.{name}"' not in api_page]
    assert missing == [], f"functions of flywheel.api without a reference entry: {missing}"
    reference = (site / "reference" / "configuration" / "index.html").read_text()
    assert 'id="serving"' in reference and "<code>log.retention_days</code>" in reference
    assert "<code>target_modules</code>" in reference
    assert not list(site.rglob("*.py")), "the hook was copied into the site"
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # nothing fetched when read


def test_every_module_of_src_is_on_the_architecture_page():
    page = (DOCS / "architecture.md").read_text()
    src = REPO / "src"
    modules = [".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
               for p in sorted((src / "flywheel").rglob("*.py")) if "migrations" not in p.parts]
    missing = [m for m in modules if f"`{m}`" not in page]
    assert missing == [], f"modules missing from docs/architecture.md: {missing}"
    gone = [m for m in re.findall(r"^\| `(flywheel[\w.]*)` \|", page, flags=re.M) if m not in modules]
    assert gone == [], f"docs/architecture.md names modules that do not exist: {gone}"


def test_the_configuration_reference_covers_every_field_and_the_guide_names_only_real_ones():
    from flywheel.config import Config, LlmConfig

    reference = hook().render()
    tabular, lora = reference.split("## A LoRA fine-tuning project", 1)
    for model, page in ((Config, tabular), (LlmConfig, lora)):
        rows = hook().fields_of(model)
        # every field is on its section's table, under the heading of its top-level key
        sections = dict(re.findall(r"^### `(\w+)`\n\n(.*?)(?=^### |\Z)", page, flags=re.M | re.S))
        for path, *_ in rows:
            top = re.split(r"[.\[]", path, maxsplit=1)[0]
            rest = path[len(top):].lstrip(".")
            where = sections.get(top, page) if rest else page
            assert f"`{rest or path}`" in where, f"{model.__name__}: {path} missing from the reference"
        # and says what it is: a field added without the comment above it fails here
        undescribed = [path for path, *_, note in rows if not note]
        assert undescribed == [], f"fields of {model.__name__} with no comment in config.py: {undescribed}"
    paths = {re.sub(r"\[kind=\w+\]", "", row[0]) for model in (Config, LlmConfig)
             for row in hook().fields_of(model)}
    assert {"data.window.start", "serving.clients", "retraining.triggers.drift", "text.template",
            "serving.runtime"} <= paths
    # the topic guide's tables name fields in their first column: each must exist
    guide = (DOCS / "configuration.md").read_text()
    named = {name for cell in re.findall(r"^\| (`[^|]+) \|", guide, flags=re.M)
             for name in re.findall(r"`([a-z_.]+)", cell)}
    unknown = sorted(n for n in named if n not in paths and not any(k.startswith(n + ".") for k in paths))
    assert unknown == [], f"docs/configuration.md names fields the config does not have: {unknown}"


def test_pages_and_the_readme_stay_short():
    lines = {p.name: len(p.read_text().splitlines()) for p in DOCS.glob("*.md")}
    long_pages = {name: n for name, n in lines.items() if n > MAX_PAGE_LINES}
    assert long_pages == {}
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
