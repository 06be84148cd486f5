"""A registered LoRA adapter ready to generate: base + adapter, hash-checked, merged at load time.

Merged, not applied on the fly: the served weights are W + BA once, so each generated token costs
exactly the base model's matmuls (no extra LoRA products and PEFT wrapper calls per adapted layer
per token; `benchmarks/lora_generate.py` measures the difference). Hot swap loads a fresh base for
the new adapter anyway, so merging costs nothing there; the price is one base copy per loaded
version (about 540 MB for SmolLM2-135M in fp32) for the seconds a swap overlaps.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel.config import LlmProject
from flywheel.core.extras import require
from flywheel.llm.base import BASE_REF_TAG, BaseRef, base_for_ref, load_model, load_tokenizer
from flywheel.registry import Registry, RegistryError

# torch's global generator is what `generate` samples from: seeded (or any sampling) generations
# take this lock so that two of them never draw from it at once.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length"


@dataclass(frozen=True)
class LoadedGenerator:
    name: str
    version: int
    run_id: str
    model: Any
    tokenizer: Any
    base: BaseRef
    lineage: dict[str, Any]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def prompt_tokens(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None) -> Generation:
        """Greedy when temperature is 0, else sampling (seeded if `seed` is given)."""
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "attention_mask": torch.ones_like(ids)}
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
        return Generation(text, len(prompt_ids), len(new), "stop" if stopped else "length")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "lineage": self.lineage,
                "base_model": self.base.base_model, "merged": True}


def load_generator(project: LlmProject, registry: Registry, version: int) -> LoadedGenerator:
    """Base (weights hash checked) + adapter (file hashes checked), merged, warmed."""
    require("llm", "serving a LoRA project")
    from peft import PeftModel

    info = registry.version(version)
    ref_text = info.run_tags.get(BASE_REF_TAG)
    if ref_text is None:
        raise RegistryError(f"{registry.model_name} v{version} is not a LoRA adapter (no {BASE_REF_TAG})")
    base = base_for_ref(project, BaseRef.from_json(ref_text))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = registry.download_verified(version, Path(tmp))
        model = load_model(base.folder)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    tokenizer = load_tokenizer(base.folder)
    loaded = LoadedGenerator(
        name=registry.model_name, version=version, run_id=info.run_id, model=merged,
        tokenizer=tokenizer, base=base.ref,
        lineage={"run_id": info.run_id, "model_type": "lora", "base_model": base.ref.base_model,
                 "base_weights_sha256": base.ref.weights_sha256,
                 "text_sha256": info.run_tags.get("data_hash"), "git_sha": info.run_tags.get("git_sha"),
                 "gate": info.tags.get("gate"),
                 "perplexity_before": info.metrics.get("perplexity_before"),
                 "perplexity_after": info.metrics.get("perplexity_after")})
    loaded.generate(loaded.prompt_tokens("Warm up") or [tokenizer.eos_token_id], 2, 0.0, 1.0, None)
    return loaded
