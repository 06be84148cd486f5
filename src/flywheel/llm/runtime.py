"""A registered LoRA adapter ready to generate: base + adapter, hash-checked, merged at load time.

Merged, not applied on the fly: the served weights are W + BA once, so each generated token costs
exactly the base model's matmuls (no extra LoRA products and PEFT wrapper calls per adapted layer
per token; `benchmarks/lora_generate.py` measures the difference). Hot swap loads a fresh base for
the new adapter anyway, so merging costs nothing there; the price is one base copy per loaded
version (about 540 MB for SmolLM2-135M in fp32) for the seconds a swap overlaps.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel.config import LlmProject
from flywheel.core.extras import require
from flywheel.llm.base import (
    BASE_REF_TAG,
    BaseFiles,
    BaseRef,
    base_for_ref,
    load_tokenizer,
    merge_adapter,
)
from flywheel.registry import Registry, RegistryError, VersionInfo

# torch's global generator is what `generate` samples from: seeded (or any sampling) generations
# take this lock so that two of them never draw from it at once.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length"


class TextGenerator:
    """What both runtimes share: the Hugging Face tokenizer's ids in, text pieces out.

    A runtime sets `tokenizer` and `base` and implements `generate`; `stream` runs `generate` on a
    worker thread with a streamer (an iterable of text pieces with `end()`) from `new_streamer`.
    """

    name: str
    version: int
    run_id: str
    tokenizer: Any
    base: BaseRef

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def prompt_tokens(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def chat_prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate(f"{self.base.base_model} has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.prompt_tokens(str(text))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: Sequence[str] = (), streamer: Any = None,
                 cancel: threading.Event | None = None) -> Generation:
        raise NotImplementedError

    def new_streamer(self) -> Any:
        return TextQueue()

    def stream(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop: Sequence[str] = (),
               cancel: threading.Event | None = None) -> Iterator[str | Generation]:
        """The generated text piece by piece as the tokens come, then the `Generation` itself.
        Text that may be the start of a stop string is held back until it is known not to be."""
        streamer = self.new_streamer()
        done: dict[str, Any] = {}

        def work() -> None:
            try:
                done["out"] = self.generate(prompt_ids, max_new_tokens, temperature, top_p, seed, stop,
                                            streamer, cancel)
            except BaseException as exc:  # handed to the reader, which re-raises it
                done["error"] = exc
                streamer.end()

        worker = threading.Thread(target=work, name="generate-stream", daemon=True)
        worker.start()
        hold = max((len(s) for s in stop), default=1) - 1
        pending, finished = "", False
        for piece in streamer:
            if finished:
                continue  # a stop string was seen: the generation ends in a token or two
            pending += piece
            cut = first_stop(pending, stop)
            if cut is not None:
                pending, finished = pending[:cut], True
            ready = len(pending) if finished else len(pending) - hold
            if ready > 0:
                yield pending[:ready]
                pending = pending[ready:]
        worker.join()
        if "error" in done:
            raise done["error"]
        if pending:
            yield pending
        yield done["out"]


class TextQueue:
    """A streamer a runtime fills with text pieces (`put`) and closes (`end`); read by iterating."""

    def __init__(self) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()

    def put(self, text: str) -> None:
        if text:
            self.queue.put(text)

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get()) is not None:
            yield piece


@dataclass(frozen=True)
class LoadedGenerator(TextGenerator):
    """The merged model in PyTorch, decoded by transformers' `generate`."""

    name: str
    version: int
    run_id: str
    model: Any
    tokenizer: Any
    base: BaseRef
    lineage: dict[str, Any]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: Sequence[str] = (), streamer: Any = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Greedy when temperature is 0, else sampling (seeded if `seed` is given). Generation ends
        at a `stop` string (left out of the text), and soon after `cancel` is set."""
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "attention_mask": torch.ones_like(ids)}
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stop or cancel is not None:
            kwargs["stopping_criteria"] = _stopping(self.tokenizer, len(prompt_ids), stop, cancel)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            with _RNG_LOCK, torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(ids, **kwargs)
        else:
            with torch.no_grad():
                out = self.model.generate(ids, do_sample=False, **kwargs)
        new = out[0, len(prompt_ids):].tolist()
        eos = self.tokenizer.eos_token_id
        stopped = bool(new) and new[-1] == eos
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = first_stop(text, stop)
        if cut is not None:
            text, stopped = text[:cut], True
        return Generation(text, len(prompt_ids), len(new), "stop" if stopped else "length")

    def new_streamer(self) -> Any:
        from transformers import TextIteratorStreamer

        return TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "lineage": self.lineage,
                "base_model": self.base.base_model, "merged": True, "runtime": "transformers"}


class NoChatTemplate(ValueError):
    """The base model's tokenizer has no chat template."""


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


class IncrementalText:
    """The text of a growing list of token ids, decoded a few tokens at a time and searched for
    stop strings only where a new one could start: linear in the answer's length.

    Decoding every id so far at each new token, and scanning the whole text for the stop strings,
    cost O(n^2) per answer. As vLLM and TGI do, each step decodes a short window from the last
    point where the text was stable (`prefix`) and keeps what it adds beyond the window's start;
    a piece that ends inside a character (U+FFFD) waits for the next token. `final()` decodes the
    whole list once, so the answer is exactly what decoding all ids gives."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0
        self.stop_at: int | None = None

    def add(self, token: int) -> str:
        """Take one token; the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if self.stop and self.stop_at is None:
            self.stop_at = first_stop(self.text[start:], self.stop)
            if self.stop_at is not None:
                self.stop_at += start
        return piece

    def final(self) -> str:
        """The whole text, decoded once from every id."""
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))


def _stopping(tokenizer: Any, prompt_len: int, stop: Sequence[str],
              cancel: threading.Event | None) -> Any:
    """Stop once the generated text holds a stop string, or `cancel` is set. The generated part
    only: transformers' own `stop_strings` also match across the end of the prompt (a prompt
    ending in "s" stopped at "ss" for the stop string "sss")."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            done = cancel is not None and cancel.is_set()
            if not done and stop:
                text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
                done = first_stop(text, stop) is not None
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    return StoppingCriteriaList([Stop()])


def load_generator(project: LlmProject, registry: Registry, version: int) -> LoadedGenerator:
    """Base (weights hash checked) + adapter (file hashes checked), merged, warmed."""
    require("llm", "serving a LoRA project")
    info, base = adapter_version(project, registry, version)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = registry.download_verified(version, Path(tmp))
        merged = merge_adapter(base.folder, adapter)
    tokenizer = load_tokenizer(base.folder)
    loaded = LoadedGenerator(name=registry.model_name, version=version, run_id=info.run_id, model=merged,
                             tokenizer=tokenizer, base=base.ref, lineage=lineage(info, base.ref))
    loaded.generate(loaded.prompt_tokens("Warm up") or [tokenizer.eos_token_id], 2, 0.0, 1.0, None)
    return loaded


def adapter_version(project: LlmProject, registry: Registry, version: int) -> tuple[VersionInfo, BaseFiles]:
    """A registered LoRA version and its base model's files (weights hash checked)."""
    info = registry.version(version)
    ref_text = info.run_tags.get(BASE_REF_TAG)
    if ref_text is None:
        raise RegistryError(f"{registry.model_name} v{version} is not a LoRA adapter (no {BASE_REF_TAG})")
    return info, base_for_ref(project, BaseRef.from_json(ref_text))


def lineage(info: VersionInfo, ref: BaseRef) -> dict[str, Any]:
    return {"run_id": info.run_id, "model_type": "lora", "base_model": ref.base_model,
            "base_weights_sha256": ref.weights_sha256, "text_sha256": info.run_tags.get("data_hash"),
            "git_sha": info.run_tags.get("git_sha"), "gate": info.tags.get("gate"),
            "perplexity_before": info.metrics.get("perplexity_before"),
            "perplexity_after": info.metrics.get("perplexity_after")}
