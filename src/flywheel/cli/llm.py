"""Commands of LoRA fine-tuning projects: finetune, export, publish."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flywheel import api
from flywheel.cli import render
from flywheel.cli.common import ConfigOpt, command, out, reporter


def register(app: typer.Typer) -> None:
    """The commands of this module, on the `flywheel` app (in the order --help lists them)."""
    for name, fn in (("finetune", finetune), ("export", export), ("publish", publish)):
        command(app, name)(fn)


def finetune(
    config: ConfigOpt = Path("examples/constitution-lora/flywheel.yaml"),
    steps: Annotated[int | None, typer.Option(min=1, help="Override training.steps.")] = None,
) -> None:
    """LoRA fine-tuning: train an adapter, log it to MLflow, register it, gate on held-out perplexity."""
    overrides = {"FLYWHEEL_TRAINING__STEPS": str(steps)} if steps else {}
    project = api.load_llm(config, env={**os.environ, **overrides})
    with reporter() as rep:
        result = api.finetune(project, rep)
    render.finetuned(project.config.registered_model, result)


def export(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o",
                                         help="Folder to write (empty, or pass --overwrite).")],
    merge: Annotated[bool, typer.Option(help="Merge the adapter into the base: a plain transformers "
                                             "model folder (safetensors + tokenizer).")] = False,
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="safetensors (the folder), or gguf: the folder "
                                                      "and one GGUF file for llama.cpp.")] = "safetensors",
    precision: Annotated[str, typer.Option(
        help="The GGUF file's weights: f32, f16, q8_0, q4_0, q4_k_m or iq4_nl.")] = "f16",
) -> None:
    """Write a LoRA version as files: the adapter, or with --merge a merged model folder."""
    done = api.export(api.load_llm(config), output, merge, version, overwrite, fmt, precision)
    kind = "merged model" if done.merged else "adapter"
    out.print(f"v{done.version} as a {kind} in {done.folder}: {', '.join(done.files)}")


def publish(
    config: ConfigOpt,
    repo_id: Annotated[str, typer.Option("--repo-id",
                                         help="HuggingFace repo, e.g. you/constitution-smollm2.")],
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = True,
    gguf: Annotated[str | None, typer.Option(
        help="Also upload the merged model as one GGUF file for llama.cpp at this precision: f32, f16, "
             "q8_0, q4_0, q4_k_m, iq4_nl.")] = None,
) -> None:
    """Push the merged model to the HuggingFace Hub (needs HF_TOKEN and a reachable hub)."""
    done = api.publish(api.load_llm(config), repo_id, version, private, gguf)
    out.print(f"published to {done.url}")
