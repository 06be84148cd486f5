"""The full image's llama.cpp is compiled for a baseline CPU, not for the machine that builds the
image: pip compiles llama-cpp-python with -march=native, and that build dies of SIGILL (an illegal
instruction) on a CPU without this one's AVX-512 or AMX."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flywheel.config import cache_dir
from flywheel.image import PORTABLE_CMAKE, PORTABLE_MARK, portable_wheel
from flywheel.llm.gguf_export import write_gguf
from tests.tiny_llm import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
# The wheels folder `flywheel image build --kind full` uses: the baseline build (minutes) is made
# once per machine and kept there, for these tests and the image alike.
WHEELS = cache_dir() / "image-context" / "full" / "wheels"
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deploy-portable-wheel")]


@pytest.fixture(scope="module")
def wheel() -> Path:
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("mlflywheel-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(WHEELS), str(REPO)], check=True, capture_output=True)
    return portable_wheel(WHEELS, ["--constraint", str(REPO / "requirements.lock")])


def cpu_library(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into)
    return next(p for p in (into / "llama_cpp" / "lib").glob("libggml-cpu.so*") if not p.is_symlink())


def test_the_wheel_has_no_avx512_or_amx_instruction(wheel: Path, tmp_path: Path) -> None:
    """No zmm register (AVX-512) and no tile instruction (AMX) in its CPU code, where the build for
    this machine's venv has them whenever this CPU does; the lock's version; recorded as built so."""
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(cpu_library(wheel, tmp_path))],
                          capture_output=True, text=True, check=True).stdout
    assert len(code) > 1_000_000  # really disassembled
    assert "vfmadd" in code and "ymm" in code  # the AVX2/FMA baseline is there
    assert not re.search(r"%zmm\d|\btile(zero|loadd|stored|dpbssd|release)\b|ldtilecfg", code)
    assert "llama_cpp_python-0.3.36-" in wheel.name  # the version the lock pins
    assert (WHEELS / PORTABLE_MARK).read_text().count(PORTABLE_CMAKE["x86_64"]) == 1


def test_the_wheel_decodes_and_is_built_once(wheel: Path, tmp_path: Path) -> None:
    """Unpacked on its own, it loads a 4-bit GGUF and decodes; asking again reuses the wheel."""
    site = tmp_path / "site"
    cpu_library(wheel, site)
    write_gguf(build_tiny_model(tmp_path / "tiny"), tmp_path / "q4_0.gguf", "q4_0")
    run = ("import sys\nfrom llama_cpp import Llama\n"
           "llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)\n"
           "print([int(t) for _, t in zip(range(6), llm.generate([1, 5, 9], temp=0.0, top_k=1))])\n")
    done = subprocess.run([sys.executable, "-c", run, str(tmp_path / "q4_0.gguf")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(eval(done.stdout.strip().splitlines()[-1])) == 6
    stamp = wheel.stat().st_mtime_ns
    assert portable_wheel(WHEELS, ["--constraint", str(REPO / "requirements.lock")]) == wheel
    assert wheel.stat().st_mtime_ns == stamp
