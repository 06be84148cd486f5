"""llama.cpp's repacked weight buffers, checked before use on CPUs that report AMX: on some virtual
machines its AMX tile instructions kill the process (SIGILL), and serving must not die of it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flywheel.llm import llamacpp
from flywheel.llm.gguf_export import write_gguf
from flywheel.llm.llamacpp import extra_buffers_work, open_model
from tests.tiny_llm import build_tiny_model

pytest.importorskip("llama_cpp", reason="the [llamacpp] extra is part of the test environment")


@pytest.fixture(scope="module")
def quantised(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    out = tmp_path_factory.mktemp("gguf")
    files = []
    for precision in ("q8_0", "q4_0"):
        write_gguf(folder, out / f"{precision}.gguf", precision)  # type: ignore[arg-type]
        files.append(out / f"{precision}.gguf")
    return files


def test_quantised_weights_decode_in_this_process_whatever_the_cpu(quantised: list[Path]) -> None:
    """q8_0 and q4_0 are the types llama.cpp multiplies with AMX tiles; each opens and decodes here
    (on a machine where the tiles fault, only because the check sent them to plain buffers)."""
    for path in quantised:
        llm = open_model(path, 64, 2)
        got = [int(t) for _, t in zip(range(8), llm.generate([1, 5, 9], temp=0.0, top_k=1), strict=False)]
        llm.close()
        assert len(got) == 8 and all(0 <= t < llm.n_vocab() for t in got)


def test_a_probe_killed_by_a_signal_sends_the_weights_to_plain_buffers(
        quantised: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The decision, on any CPU: a child that dies of SIGILL (as AMX does where it faults) means
    plain buffers, decided once per file, with a warning that names the signal; a child that exits,
    even with an error, leaves llama.cpp's default; a model in plain buffers decodes."""
    monkeypatch.setattr(llamacpp, "_reports_amx", lambda: True)
    monkeypatch.setattr(llamacpp, "_PROBED", {})
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    with caplog.at_level(logging.WARNING, logger="flywheel.serving"):
        assert extra_buffers_work(quantised[0], probe=killed) is False
    assert any("SIGILL" in r.__dict__.get("detail", "") for r in caplog.records)
    assert extra_buffers_work(quantised[0], probe="raise SystemExit(0)") is False  # kept per file
    assert extra_buffers_work(quantised[1], probe="raise SystemExit(3)") is True
    monkeypatch.setattr(llamacpp, "_PROBED", {})  # a signal with no name (real-time) is named by number
    realtime = "import os, signal; os.kill(os.getpid(), signal.SIGRTMIN + 3)"
    with caplog.at_level(logging.WARNING, logger="flywheel.serving"):
        assert extra_buffers_work(quantised[1], probe=realtime) is False
    assert any("signal" in r.__dict__.get("detail", "") and "SIG" not in r.__dict__.get("detail", "")
               for r in caplog.records)
    plain = open_model(quantised[0], 64, 2)
    got = [int(t) for _, t in zip(range(8), plain.generate([1, 5, 9], temp=0.0, top_k=1), strict=False)]
    plain.close()
    assert len(got) == 8
