"""`flywheel image build`: the serving or full container image, from the Dockerfile beside this
module, built without network access inside the build.

The context is made here: the Dockerfile and the entry point, the project's config when it is to
be baked in, and wheels/ with a wheel for every package the image installs (`pip wheel` on this
machine, so the wheels are for this machine's Python and the base image must have the same
version). In a source checkout the project's own wheel is built from the checkout; otherwise the
installed version is fetched from the package index.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from flywheel.config import cache_dir
from flywheel.core.errors import FlywheelError
from flywheel.core.secrets import has_password

HERE = Path(__file__).parent
# image kind -> the extra its venv installs
KINDS = {"serving": "serve", "full": "all"}
DEFAULT_BASE = "python:{python}-slim-bookworm"
# llama.cpp's build compiles for the CPU it runs on (-march=native): an image built on a machine
# with AVX-512 or AMX would die of SIGILL on an older one. The full image's is built for a baseline
# instead: any x86-64 since 2013 (AVX2, FMA, F16C), or any 64-bit Arm. On an AVX-512 + AMX machine
# it decoded as fast as the native build (f16 48-49 against 49-52 tokens/s, q4_0 90-117 against
# 99-108, SmolLM2-135M on 2 cores).
PORTABLE = "llama-cpp-python"
PORTABLE_CMAKE = {"x86_64": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                            "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF",
                  "aarch64": "-DGGML_NATIVE=OFF"}
PORTABLE_MARK = "portable.json"


class ImageError(FlywheelError):
    """The image could not be built (docker missing, a wheel not found, the build failed)."""


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    kind: str
    base: str
    size_bytes: int
    seconds: float


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def source_tree() -> Path | None:
    """The checkout this flywheel runs from (an editable install), or None for an installed wheel."""
    root = HERE.parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "mlflywheel"' in pyproject.read_text():
        return root
    return None


def _pip(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise ImageError(f"{what} failed (pip {' '.join(args[:2])} …):\n{done.stderr[-3000:]}")


def _put_config(folder: Path, config: Path | None) -> None:
    """The project's config into the context, refused when it holds a password."""
    folder.mkdir(exist_ok=True)
    if config is None:  # COPY needs something there; the config is mounted at run time
        (folder / "MOUNT-flywheel.yaml-HERE").write_text("")
        return
    if not config.is_file():
        raise ImageError(f"no config at {config}")
    if has_password(config.read_text(errors="replace")):
        # a layer keeps it for everyone who can pull the image, even if a later one deletes it
        raise ImageError(f"{config} holds a URL with a password, which the image would keep in a "
                         "layer: give the stores at run time instead (FLYWHEEL_STORES__STATE, or "
                         "FLYWHEEL_STORES__STATE_FILE naming a mounted secret file), or build "
                         "without --config and mount the config")
    shutil.copy(config, folder / "flywheel.yaml")


def prepare_context(kind: str, context: Path, config: Path | None = None,
                    base_python: str | None = None) -> str:
    """Fill `context` for `docker build`; the version of mlflywheel it installs."""
    if kind not in KINDS:
        raise ImageError(f"unknown image kind {kind!r}: one of {', '.join(KINDS)}")
    wheels = context / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "Dockerfile", context / "Dockerfile")
    shutil.copy(HERE / "entrypoint.sh", context / "entrypoint.sh")
    _put_config(context / "config", config)
    ours = installed_version("mlflywheel")
    tree = source_tree()
    for old in wheels.glob("mlflywheel-*.whl"):
        old.unlink()
    if tree is not None:
        _pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(tree)],
             "building mlflywheel's wheel from the checkout")
    else:
        _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
              f"mlflywheel=={ours}"], f"fetching mlflywheel {ours}")
    lock = tree / "requirements.lock" if tree is not None else None
    constraints = ["--constraint", str(lock)] if lock is not None and lock.is_file() else []
    if kind == "full":
        portable_wheel(wheels, constraints)
    _pip(["wheel", "--quiet", "--wheel-dir", str(wheels), "--find-links", str(wheels), *constraints,
          f"mlflywheel[{KINDS[kind]}]=={ours}"], f"collecting the wheels of mlflywheel[{KINDS[kind]}]")
    if base_python is not None:
        for _ in range(5):  # what the base's Python needs besides (markers on its exact version)
            missing = missing_for_python(wheels, base_python)
            if not missing:
                break
            _pip(["wheel", "--quiet", "--wheel-dir", str(wheels), "--find-links", str(wheels), *constraints,
                  *missing], f"collecting the wheels Python {base_python} needs besides")
    return ours


def portable_wheel(wheels: Path, constraints: list[str]) -> Path:
    """llama-cpp-python's wheel in `wheels`, compiled for the baseline CPU of this architecture
    (`PORTABLE_CMAKE`), at the version mlflywheel's wheel there asks for (and the lock pins). pip
    would otherwise take the wheel it compiled for this machine's venv from its cache. Built once
    (minutes: cmake and a C++ compiler); `portable.json` names the wheels built so."""
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    if machine not in PORTABLE_CMAKE:
        raise ImageError(f"no baseline build of {PORTABLE} for the {machine} architecture")
    ours = next(wheels.glob("mlflywheel-*.whl"))
    wanted = next((line.removeprefix("Requires-Dist:").split(";")[0].strip()
                   for line in _metadata(ours).splitlines()
                   if line.startswith(f"Requires-Dist: {PORTABLE}")), PORTABLE)
    mark = wheels / PORTABLE_MARK
    built = json.loads(mark.read_text()) if mark.is_file() else {}
    pattern = f"{PORTABLE.replace('-', '_')}-*.whl"
    for wheel in wheels.glob(pattern):
        if built.get(wheel.name) != PORTABLE_CMAKE[machine]:
            wheel.unlink()  # this machine's build, or another baseline's
    with tempfile.TemporaryDirectory() as tmp:
        _pip(["wheel", "--quiet", "--no-cache-dir", "--no-deps", "--wheel-dir", tmp, "--find-links",
              str(wheels), *constraints, wanted], f"building {PORTABLE} for a baseline {machine} CPU",
             env={"CMAKE_ARGS": PORTABLE_CMAKE[machine], "FORCE_CMAKE": "1"})
        made = next(Path(tmp).glob(pattern))
        if not (wheels / made.name).is_file():
            shutil.move(made, wheels / made.name)
    built = {made.name: PORTABLE_CMAKE[machine]}
    mark.write_text(json.dumps(built, indent=2))
    return wheels / made.name


def missing_for_python(wheels: Path, full_version: str) -> list[str]:
    """Requirements of the wheels in `wheels` that hold only on Python `full_version` (a marker on
    the exact version, e.g. python_full_version < "3.11.3") and have no wheel there yet."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    present = {canonicalize_name(w.name.split("-")[0]) for w in wheels.glob("*.whl")}
    here: dict[str, Any] = dict(default_environment())
    there = {**here, "python_full_version": full_version,
             "python_version": ".".join(full_version.split(".")[:2])}
    missing = set()
    for wheel in wheels.glob("*.whl"):
        for line in _metadata(wheel).splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.removeprefix("Requires-Dist:").strip())
            if req.marker is None or "extra" in str(req.marker) or canonicalize_name(req.name) in present:
                continue
            if req.marker.evaluate(there) and not req.marker.evaluate(here):
                missing.add(str(req).split(";")[0].strip())
    return sorted(missing)


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8", "replace")


def base_python_version(base: str) -> str | None:
    """The exact Python version of a local base image (None when the image is not here yet:
    docker pulls it during the build)."""
    if docker("image", "inspect", base, check=False).returncode != 0:
        return None
    done = docker("run", "--rm", "--entrypoint", "python3", base, "-c",
                  "import platform; print(platform.python_version())", check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def docker(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker") is None:
        raise ImageError("docker is not installed here (the client, and an engine it can reach)")
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DOCKER_BUILDKIT": "0"})  # the legacy builder: Debian's dockerd
    if check and done.returncode != 0:  # the build's own errors are on stdout
        raise ImageError(f"docker {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def build_image(kind: str = "serving", tag: str | None = None, base: str | None = None,
                config: Path | None = None, context: Path | None = None) -> BuiltImage:
    """Build the image of `kind` on `base` (default: the public slim image of this Python)."""
    started = time.perf_counter()
    python = python_version()
    base = base or DEFAULT_BASE.format(python=python)
    tag = tag or f"flywheel:{kind}"
    context = context or cache_dir() / "image-context" / kind
    ours = prepare_context(kind, context, config, base_python_version(base))
    docker("build", "--target", kind, "--tag", tag, "--build-arg", f"BASE={base}",
           "--build-arg", f"PYTHON={python}", "--build-arg", f"VERSION={ours}", str(context))
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    return BuiltImage(tag, kind, base, size, time.perf_counter() - started)
