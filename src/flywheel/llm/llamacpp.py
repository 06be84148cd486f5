"""The llama.cpp runtime of a LoRA project: the merged model as a GGUF file, decoded on the CPU by
llama-cpp-python (`serving.runtime: llama.cpp`).

The GGUF is written once, at fine-tuning, at `serving.precision` (f32, f16, q8_0, q4_0, q4_k_m or
iq4_nl) with the tokenizer files beside it, logged to the version's run under `gguf-<precision>/`
and each file's SHA-256 recorded on the version; `flywheel finetune` measures its held-out
perplexity there, next to the full-precision model's, and the gate refuses an export that costs
more than `gate.max_export_cost`. A server downloads those files into `<home>/cache/gguf/`, checks every hash
before each load, and decodes with llama.cpp. A version fine-tuned before the project chose this
runtime has no such files: the server builds them itself from the hash-checked adapter and base
(a warning says so; it needs the `llm` extra's PyTorch) and keeps them in the same cache with
their hashes.

Text in and out is the Hugging Face tokenizer's, exactly as on the transformers runtime: the
prompt's token ids go to llama.cpp, the generated ids come back and are decoded by the tokenizer.

Concurrency: a llama.cpp context decodes one sequence at a time and llama-cpp-python has no
batching across requests, so each worker holds `serving.max_concurrent` contexts over the one
memory-mapped weights file (each context is its own KV cache) and a generation takes a free one;
the generation slots (`max_concurrent` running, `max_waiting` queued, 429 beyond) bound it as on
the transformers runtime. With `threads` unset, every context uses every core.

On a CPU that reports AMX, each file is first decoded once in a child process: where llama.cpp's
AMX tiles fault (some virtual machines), the weights load into plain buffers instead of killing
the server (`extra_buffers_work`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import LlmProject
from flywheel.core.cpus import usable_cpus
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import require
from flywheel.llm.base import BASE_REF_TAG, BaseRef, load_tokenizer, merge_adapter
from flywheel.llm.gguf_export import Precision, write_gguf
from flywheel.llm.runtime import (
    Generation,
    IncrementalText,
    TextGenerator,
    adapter_version,
    first_stop,
    lineage,
)
from flywheel.registry import Registry, file_sha256

log = logging.getLogger("flywheel.serving")

HASHES = ".flywheel-hashes.json"  # the hashes of an export built by a server (none was registered)


class ExportMissing(FlywheelError):
    """The served export cannot be found or trusted; the message says why."""


def export_artifact(precision: str) -> str:
    """Where a version's run keeps its GGUF export at `precision`."""
    return f"gguf-{precision}"


def gguf_name(precision: str) -> str:
    return f"model-{precision}.gguf"


def build_export(base_folder: Path, adapter: Path, out: Path, precision: Precision, name: str) -> Path:
    """The adapter merged into the base, written to the new folder `out` as one GGUF file at
    `precision` plus the tokenizer's files."""
    with tempfile.TemporaryDirectory() as tmp:
        merge_adapter(base_folder, adapter).save_pretrained(tmp)
        tokenizer = load_tokenizer(base_folder)
        tokenizer.save_pretrained(tmp)
        out.mkdir(parents=True)
        write_gguf(Path(tmp), out / gguf_name(precision), precision, name)
        tokenizer.save_pretrained(out)
    return out


def open_model(path: Path, n_ctx: int, threads: int | None, logits_all: bool = False) -> Any:
    """The GGUF file in a llama.cpp context; its weights in llama.cpp's faster CPU buffers where
    those run on this machine (`extra_buffers_work`)."""
    import llama_cpp
    from llama_cpp import Llama

    n = threads or usable_cpus()
    if extra_buffers_work(path):
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=n,
                     n_threads_batch=n, logits_all=logits_all, verbose=False)
    # llama-cpp-python takes no such setting: its defaults are read when the model loads.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _PARAMS_LOCK:
        llama_cpp.llama_cpp.llama_model_default_params = plain
        try:
            return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=n,
                         n_threads_batch=n, logits_all=logits_all, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults


_PARAMS_LOCK = threading.Lock()
_PROBED: dict[tuple[str, int, int], bool] = {}
# Loads the file as serving does and decodes a prompt, then single tokens (both kinds of matmul).
PROBE = """import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=int(sys.argv[2]), verbose=False)
llm.eval(list(range(1, 17)))
llm.eval([17])
llm.eval([18])
"""


def extra_buffers_work(path: Path, probe: str = PROBE) -> bool:
    """Whether llama.cpp may keep this file's weights in its CPU "extra" buffers (repacked for Intel
    AMX tiles or wider SIMD: faster, and llama.cpp's default).

    On a CPU that reports AMX, llama.cpp built for it multiplies 4- and 8-bit weights with AMX tile
    instructions, and on some virtual machines those fault (SIGILL: the process dies). So there,
    once per file and process, a child process loads the file and decodes a few tokens the default
    way; if the child dies of a signal, the weights load into plain buffers instead (slower, same
    results) and a warning says so. A CPU without AMX needs no such check."""
    if not _reports_amx():
        return True
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _PROBED:
        done = subprocess.run([sys.executable, "-c", probe, str(path), str(usable_cpus())],
                              capture_output=True, text=True, timeout=600)
        _PROBED[key] = done.returncode >= 0
        if done.returncode < 0:
            number = -done.returncode
            name = signal.Signals(number).name if number in set(signal.Signals) else f"signal {number}"
            log.warning("llama.cpp's repacked weights crash on this CPU", extra={
                "event": "llamacpp_plain_buffers", "detail": (
                    f"loading {path.name} the default way killed a test process ({name}); its "
                    "weights load into plain buffers (slower, the same tokens)")})
    return _PROBED[key]


def _reports_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_tile" in flags


def gguf_perplexity(path: Path, blocks: list[list[int]], threads: int | None = None,
                    advance: Callable[[int, int], None] | None = None) -> float:
    """exp(mean next-token negative log-likelihood) of llama.cpp over the blocks: the same measure
    as the fine-tuning run's (each block scored on its own, every token after the first)."""
    require("llamacpp", "measuring the GGUF export")
    llm = open_model(path, max(len(b) for b in blocks), threads, logits_all=True)
    nll, count = 0.0, 0
    try:
        for i, block in enumerate(blocks):
            llm.reset()
            llm.eval(block)
            logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((logz - logits[np.arange(len(block) - 1), block[1:]]).sum())
            count += len(block) - 1
            if advance:
                advance(i + 1, len(blocks))
    finally:
        llm.close()
    return math.exp(nll / count)


@dataclass(frozen=True)
class ExportCost:
    precision: str
    perplexity: float
    full_precision: float
    limit: float | None

    @property
    def cost(self) -> float:
        return self.perplexity / self.full_precision - 1

    @property
    def passed(self) -> bool:
        return self.limit is None or self.cost <= self.limit

    def reason(self) -> str:
        head = (f"export: llama.cpp {self.precision} held-out perplexity {self.perplexity:.4f} vs "
                f"{self.full_precision:.4f} at full precision, cost {self.cost:+.2%}")
        if self.limit is None:
            return f"{head} (no limit set)"
        return f"{head} {'<=' if self.passed else '>'} {self.limit:.2%} {'holds' if self.passed else 'FAILS'}"


# ---- serving ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCppGenerator(TextGenerator):
    """A version as a GGUF file in `max_concurrent` llama.cpp contexts."""

    name: str
    version: int
    run_id: str
    tokenizer: Any
    base: BaseRef
    lineage: dict[str, Any]
    path: Path
    precision: str
    contexts: queue.Queue[Any]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: Sequence[str] = (), streamer: Any = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Greedy when temperature is 0 (llama.cpp's greedy sampler: the tokens of transformers'
        greedy decoding at f32/f16), else sampling at `temperature` and `top_p` from llama.cpp's
        own generator, seeded with `seed` (a random one when None)."""
        llm = self.contexts.get()
        try:
            return self._decode(llm, prompt_ids, max_new_tokens, temperature, top_p, seed, stop,
                                streamer, cancel)
        finally:
            self.contexts.put(llm)
            if streamer is not None:
                streamer.end()

    def _decode(self, llm: Any, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                top_p: float, seed: int | None, stop: Sequence[str], streamer: Any,
                cancel: threading.Event | None) -> Generation:
        if temperature > 0:
            llm.set_seed(seed if seed is not None else secrets.randbits(31))
            sampling = {"temp": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0}
        else:
            sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 1, "min_p": 0.0}
        eos = {self.tokenizer.eos_token_id, llm.token_eos()}
        room = llm.n_ctx()  # a model trained on a shorter context than prompt + max_new_tokens
        text = IncrementalText(self.tokenizer, stop)  # linear per answer, not O(n^2)
        generated, finish = 0, "length"
        tokens = llm.generate(prompt_ids, typical_p=1.0, repeat_penalty=1.0, **sampling)
        try:
            for token in tokens:
                generated += 1
                if token in eos:
                    finish = "stop"
                    break
                piece = text.add(int(token))
                # The streamer gets the text uncut, as transformers' does: the reader cuts at the stop.
                if streamer is not None and piece:
                    streamer.put(piece)
                if (text.stop_at is not None or generated >= max_new_tokens
                        or len(prompt_ids) + generated >= room or (cancel is not None and cancel.is_set())):
                    break
        finally:
            tokens.close()
        full = text.final()
        if streamer is not None:
            streamer.put(full[len(text.text):] if full.startswith(text.text) else "")
        cut = first_stop(full, stop)
        if cut is not None:
            full, finish = full[:cut], "stop"
        return Generation(full, len(prompt_ids), generated, finish)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "lineage": self.lineage,
                "base_model": self.base.base_model, "merged": True, "runtime": "llama.cpp",
                "precision": self.precision, "contexts": self.contexts.maxsize}


def load_llamacpp(project: LlmProject, registry: Registry, version: int) -> LlamaCppGenerator:
    """The version's GGUF export (hash-checked) in `max_concurrent` llama.cpp contexts, warmed."""
    require("llamacpp", "serving.runtime llama.cpp")
    cfg = project.config.serving
    folder = served_export(project, registry, version)
    tokenizer = load_tokenizer(folder)
    path = folder / gguf_name(cfg.precision)
    probe = open_model(path, 8, 1)
    trained = int(probe.metadata.get("llama.context_length", cfg.max_prompt_tokens + cfg.max_new_tokens))
    n_ctx = min(cfg.max_prompt_tokens + cfg.max_new_tokens, trained)
    probe.close()
    contexts: queue.Queue[Any] = queue.Queue(maxsize=cfg.max_concurrent)
    for _ in range(cfg.max_concurrent):
        contexts.put(open_model(path, n_ctx, cfg.threads))
    info = registry.version(version)
    ref = BaseRef.from_json(info.run_tags[BASE_REF_TAG])
    loaded = LlamaCppGenerator(name=registry.model_name, version=version, run_id=info.run_id,
                               tokenizer=tokenizer, base=ref, lineage=lineage(info, ref), path=path,
                               precision=cfg.precision, contexts=contexts)
    loaded.generate(loaded.prompt_tokens("Warm up") or [tokenizer.eos_token_id], 2, 0.0, 1.0, None)
    return loaded


def served_export(project: LlmProject, registry: Registry, version: int) -> Path:
    """The version's export at `serving.precision` in the local cache, every file's hash checked:
    the registered one (downloaded once), else one built here from the adapter and the base."""
    precision = project.config.serving.precision
    info = registry.version(version)
    folder = project.home / "cache" / "gguf" / f"{info.run_id}-{precision}"
    expected = registry.attached_hashes(version, export_artifact(precision))
    if expected:
        if not _matches(folder, expected):
            with _fresh(folder) as work:
                os.replace(registry.download_attached(version, export_artifact(precision), work),
                           work / "export")
        if not _matches(folder, expected):
            raise ExportMissing(f"the GGUF export of {registry.model_name} v{version} in {folder} does "
                                "not match the hashes recorded on the version; refusing to load it")
        return folder
    recorded = folder / HASHES
    if recorded.is_file() and _matches(folder, json.loads(recorded.read_text())):
        return folder
    log.warning("building the GGUF export here", extra={
        "event": "gguf_build", "model_version": version, "precision": precision,
        "detail": f"v{version} has no registered {precision} GGUF (fine-tuned before serving.runtime "
                  "was llama.cpp, or at another precision); run flywheel finetune to register one"})
    require("llm", "building a GGUF export for llama.cpp")
    info, base = adapter_version(project, registry, version)
    with _fresh(folder) as work:
        adapter = registry.download_verified(version, work / "adapter")
        build_export(base.folder, adapter, work / "export", precision,  # type: ignore[arg-type]
                     f"{registry.model_name}-v{version}")
        hashes = {p.name: file_sha256(p) for p in (work / "export").iterdir() if p.is_file()}
        (work / "export" / HASHES).write_text(json.dumps(hashes, indent=2))
    if not _matches(folder, json.loads(recorded.read_text())):
        raise ExportMissing(f"the GGUF export built in {folder} does not match its own hashes")
    return folder


def _matches(folder: Path, expected: dict[str, str]) -> bool:
    if not folder.is_dir():
        return False
    found = {p.name: file_sha256(p) for p in folder.iterdir() if p.is_file() and p.name != HASHES}
    return found == expected


@contextlib.contextmanager
def _fresh(folder: Path) -> Any:
    """A work folder beside `folder`; its `export` subfolder replaces `folder` whole at the end (a
    crash never leaves half a model, and a file another process has open stays valid)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield work
        old = work / "old"
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder, old)
        os.replace(work / "export", folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
