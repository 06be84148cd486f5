"""A tiny causal LM and a tokenizer trained on the fly: LoRA tests in seconds, no download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import LlmProject

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TEXT = REPO / "tests" / "fixtures" / "constitution_sample.jsonl"


def texts() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE_TEXT.read_text().splitlines() if line.strip()]
    return [f"Article {r['article']}: {r['title']}\n{r['description']}" for r in rows]


def build_tiny_model(folder: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the sample articles."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    # A plain-text chat template, for the chat endpoints (the tokenizer has no role tokens).
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(base: Path | str, **patch: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "project": "tiny-lora", "kind": "lora", "base_model": str(base),
        "text": {"source": "file", "path": str(SAMPLE_TEXT), "heldout_fraction": 0.2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"]},
        "training": {"steps": 40, "batch_size": 4, "max_seq_length": 32, "learning_rate": 0.01,
                     "warmup_steps": 2, "seed": 7},
        "samples": {"prompts": ["Article 14:", "The State shall"], "max_new_tokens": 8},
        "gate": {"floor": 1e6, "min_improvement": 0.0},
        "serving": {"reload_interval_s": 0.5, "max_new_tokens": 64, "default_max_new_tokens": 8,
                    "max_prompt_tokens": 64},
    }
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) \
            else value
    return cfg


def write_config(folder: Path, cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def reference_generation(project: LlmProject, tmp: Path, version: int, prompt: str, max_new: int,
                         temperature: float, seed: int) -> str:
    """What plain transformers generates from the merged export of `version` (in another process)."""
    out = tmp / f"merged-v{version}"
    if not out.exists():
        done = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "export", "--config", str(project.path), "--merge",
             "--version", str(version), "--output", str(out)],
            capture_output=True, text=True, env={**os.environ, "FLYWHEEL_HOME": str(project.home)})
        assert done.returncode == 0, done.stderr
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    kwargs = {"max_new_tokens": max_new, "pad_token_id": tokenizer.eos_token_id,
              "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(seed)
    with torch.no_grad():
        if temperature > 0:
            gen = model.generate(ids, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, **kwargs)
        else:
            gen = model.generate(ids, do_sample=False, **kwargs)
    return str(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))


def openai_client(server: Any) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=60)
