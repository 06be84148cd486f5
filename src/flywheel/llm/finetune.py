"""`flywheel finetune`: a LoRA adapter trained with PEFT, tracked in MLflow, gated and promoted.

The run: split the documents by document; load the base; held-out perplexity and fixed-prompt
generations before; train the adapter on packed blocks of tokens (loss per step to MLflow);
perplexity and generations after; register the adapter (safetensors, hashed) as a version of the
project's registered model with alias `challenger`; score the champion adapter on the same held-out
blocks; the gate (perplexity, lower is better) decides whether `champion` moves.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import LlmProject
from flywheel.core.cpus import usable_cpus
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import require
from flywheel.core.lineage import git_sha
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.lifecycle.aliases import promote_if_passed
from flywheel.llm.base import (
    BASE_REF_TAG,
    BaseFiles,
    BaseRef,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_base,
)
from flywheel.llm.card import publish_lora_card
from flywheel.llm.llamacpp import ExportCost, build_export, export_artifact, gguf_name, gguf_perplexity
from flywheel.llm.text import Document, TextSplit, load_split, pack, token_stream
from flywheel.registry import ADAPTER_ARTIFACT, CHALLENGER, CHAMPION, Registry
from flywheel.state.db import open_state
from flywheel.training.evaluate import GateDecision, decide_gate

log = logging.getLogger("flywheel.llm")


class FinetuneError(FlywheelError):
    """The fine-tuning run could not go on; the message says why and what to change."""


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str
    version: int
    perplexity_before: float
    perplexity_after: float
    champion_version: int | None
    champion_perplexity: float | None
    gate: GateDecision
    promoted: bool
    steps: int
    seconds_per_step: float
    tokens_per_second: float
    train_seconds: float
    wall_seconds: float
    device: str
    trainable_parameters: int
    total_parameters: int
    losses: list[float] = field(repr=False)
    generations: list[dict[str, str]] = field(repr=False)
    served: ExportCost | None = None  # the llama.cpp export's perplexity, when that runtime serves


@dataclass
class _Session:
    """What the phases of one fine-tuning run share."""

    project: LlmProject
    registry: Registry
    reporter: Reporter
    base: BaseFiles
    device: str
    tokenizer: Any
    model: Any
    train_blocks: list[list[int]]
    eval_blocks: list[list[int]]
    split: TextSplit
    tags: dict[str, str]


def finetune(project: LlmProject, reporter: Reporter | None = None) -> FinetuneResult:
    """The whole fine-tuning run; see the module's docstring."""
    require("llm", "flywheel finetune")
    started = time.perf_counter()
    registry = Registry.for_project(project)
    champion = registry.alias_version(CHAMPION)
    run = _load(project, registry, reporter or QuietReporter())
    t = project.config.training
    with registry.run(f"lora-{project.config.base_model.replace('/', '-')}", run.tags) as run_id:
        trained = _train(run, run_id)
        version, champ_ppl, gate, served = _register_and_gate(run, run_id, trained, champion)
    with run.reporter.step("Promote: move alias champion" if gate.passed else "Gate failed"):
        outcome = promote_if_passed(registry, open_state(project.state_url), version, gate.passed,
                                    gate.summary(), champion)
    try:  # the card states the gate's decision: made now that it is known
        publish_lora_card(project, registry, version)
    except Exception as exc:  # a card that cannot be made must not undo a training
        log.warning("model card not written: %s: %s (flywheel card makes it later)",
                    type(exc).__name__, exc, extra={"event": "model_card_error", "version": version})
    m = trained.metrics
    return FinetuneResult(
        run_id, version, m["perplexity_before"], m["perplexity_after"], champion, champ_ppl, gate,
        outcome.promoted, t.steps, m["seconds_per_step"], m["tokens_per_second"], m["train_seconds"],
        time.perf_counter() - started, run.device, trained.trainable, trained.total, trained.losses,
        trained.generations, served)


def _load(project: LlmProject, registry: Registry, reporter: Reporter) -> _Session:
    cfg, t = project.config, project.config.training
    _seed_everything(t.seed)
    with reporter.step("Prepare the text: split by document"):
        split = load_split(project)
    with reporter.step(f"Load the base model ({cfg.base_model})"):
        base = resolve_base(project)
        device = pick_device(t.device)
        tokenizer = load_tokenizer(base.folder)
        model = load_model(base.folder, device)
        train_blocks, eval_blocks = _blocks(split, tokenizer, t.max_seq_length, t.eval_max_tokens,
                                            t.seed)
    if not train_blocks:
        raise FinetuneError(f"the training documents make no block of {t.max_seq_length} tokens; "
                            "lower training.max_seq_length or add text")
    tags = {"model_type": "lora", "base_model": cfg.base_model, BASE_REF_TAG: base.ref.to_json(),
            "data_hash": split.source_sha256, "git_sha": git_sha(project.path.parent),
            "config_hash": project.config_hash(), "device": device}
    return _Session(project, registry, reporter, base, device, tokenizer, model, train_blocks,
                    eval_blocks, split, tags)


@dataclass(frozen=True)
class _Trained:
    peft_model: Any
    metrics: dict[str, float]
    losses: list[float]
    generations: list[dict[str, str]]
    trainable: int
    total: int


def _train(run: _Session, run_id: str) -> _Trained:
    """Perplexity and samples before, LoRA training, perplexity and samples after; all logged."""
    from peft import LoraConfig as PeftLoraConfig  # heavy (torch): only fine-tuning needs it
    from peft import get_peft_model

    cfg, t, registry, rep = run.project.config, run.project.config.training, run.registry, run.reporter
    total = sum(p.numel() for p in run.model.parameters())
    _log_params(run, run_id)
    with rep.step("Held-out perplexity before", total=len(run.eval_blocks)) as adv:
        before = perplexity(run.model, run.eval_blocks, t.batch_size, run.device, adv)
    with rep.step("Generate the fixed prompts before"):
        gens_before = generate_samples(run.model, run.tokenizer, cfg.samples.prompts,
                                       cfg.samples.max_new_tokens, run.device)
    peft_model = get_peft_model(run.model, PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT takes floats
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    registry.log_params(run_id, {"trainable_parameters": trainable, "total_parameters": total})
    with rep.step(f"Train the LoRA adapter ({t.steps} steps, {run.device})", total=t.steps) as adv:
        losses, train_seconds = train_adapter(peft_model, run.train_blocks, run.project, run.device,
                                              _MetricBuffer(registry, run_id), adv)
    with rep.step("Held-out perplexity after", total=len(run.eval_blocks)) as adv:
        after = perplexity(peft_model, run.eval_blocks, t.batch_size, run.device, adv)
    with rep.step("Generate the fixed prompts after"):
        gens_after = generate_samples(peft_model, run.tokenizer, cfg.samples.prompts,
                                      cfg.samples.max_new_tokens, run.device)
    tokens_per_step = t.batch_size * t.max_seq_length
    metrics = {
        "perplexity_before": before, "perplexity_after": after,
        "heldout_loss_before": math.log(before), "heldout_loss_after": math.log(after),
        "holdout_perplexity": after, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / t.steps,
        "tokens_per_second": tokens_per_step * t.steps / train_seconds, "final_loss": losses[-1],
    }
    registry.log_metrics(run_id, metrics)
    generations = [{"prompt": p, "before": b, "after": a}
                   for p, b, a in zip(cfg.samples.prompts, gens_before, gens_after, strict=True)]
    _log_pictures_and_text(registry, run_id, losses, before, after, generations)
    return _Trained(peft_model, metrics, losses, generations, trainable, total)


def _log_params(run: _Session, run_id: str) -> None:
    cfg, t, split = run.project.config, run.project.config.training, run.split
    run.registry.log_params(run_id, {
        **{f"lora.{k}": v for k, v in cfg.lora.model_dump().items()},
        **{f"training.{k}": v for k, v in t.model_dump().items()},
        **{f"text.{k}": v for k, v in split.describe().items()},
        "text.source": cfg.text.source, "base_model": cfg.base_model,
        "base_revision": cfg.base_revision, "base_weights_sha256": run.base.ref.weights_sha256,
        "train_blocks": len(run.train_blocks), "heldout_blocks": len(run.eval_blocks),
        "heldout_tokens": sum(len(b) - 1 for b in run.eval_blocks), "device": run.device,
    })


def _register_and_gate(run: _Session, run_id: str, trained: _Trained,
                       champion: int | None) -> tuple[int, float | None, GateDecision, ExportCost | None]:
    """Register the adapter as `challenger`; score the champion adapter on the same held-out
    blocks; decide the gate once and record it on the version."""
    registry, t = run.registry, run.project.config.training
    with run.reporter.step("Register the adapter; gate against the champion"), \
            tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / ADAPTER_ARTIFACT
        trained.peft_model.save_pretrained(str(adapter_dir))
        version = registry.register_folder(run_id, adapter_dir, ADAPTER_ARTIFACT,
                                           {**run.tags, "run_id": run_id})
        registry.set_alias(CHALLENGER, version)
        champ_ppl, reason = None, None
        if champion is not None:
            champ_ppl, reason = _champion_perplexity(registry, champion, run.base, trained.peft_model,
                                                     run.eval_blocks, t.batch_size, run.device,
                                                     Path(tmp))
        if champ_ppl is not None:
            registry.log_metrics(run_id, {"champion_perplexity": champ_ppl})
        after = trained.metrics["perplexity_after"]
        gate = GateDecision(False, [reason]) if reason is not None else decide_gate(
            run.project.config.gate, {"perplexity": after},
            None if champ_ppl is None else {"perplexity": champ_ppl}, {}, None)
    cost = None
    if run.project.config.serving.runtime == "llama.cpp":
        cost = _served_export(run, run_id, version, after)
        gate = GateDecision(gate.passed and cost.passed, [*gate.reasons, cost.reason()])
    with run.reporter.step("Record the gate's decision"):
        registry.set_version_tags(version, {
            "gate": "passed" if gate.passed else "failed", "gate_reasons": " | ".join(gate.reasons),
            "champion_at_evaluation": str(champion) if champion else "none"})
        registry.set_run_tags(run_id, {"gate": "passed" if gate.passed else "failed"})
    return version, champ_ppl, gate, cost


def _served_export(run: _Session, run_id: str, version: int, full_precision: float) -> ExportCost:
    """The version as the GGUF file llama.cpp will serve (`serving.precision`), its held-out
    perplexity next to the full-precision one, its files logged and hashed on the version."""
    cfg, registry = run.project.config, run.registry
    precision = cfg.serving.precision
    with tempfile.TemporaryDirectory() as tmp:
        with run.reporter.step(f"Export for llama.cpp: GGUF at {precision}"):
            adapter = registry.download_verified(version, Path(tmp) / "adapter")
            folder = build_export(run.base.folder, adapter, Path(tmp) / "export", precision,
                                  f"{registry.model_name}-v{version}")
        with run.reporter.step(f"Held-out perplexity of the {precision} GGUF (llama.cpp)",
                               total=len(run.eval_blocks)) as adv:
            ppl = gguf_perplexity(folder / gguf_name(precision), run.eval_blocks, cfg.serving.threads, adv)
        with run.reporter.step("Register the GGUF export on the version"):
            registry.attach_folder(version, folder, export_artifact(precision))
    cost = ExportCost(precision, ppl, full_precision, cfg.gate.max_export_cost)
    registry.log_metrics(run_id, {"perplexity_served": ppl, "served_perplexity_cost": cost.cost})
    registry.set_run_tags(run_id, {"served_precision": precision})
    return cost


# ---- pieces -------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(usable_cpus())  # torch counts cores, not the CPUs this process may use


def _blocks(split: TextSplit, tokenizer: Any, block: int, eval_max_tokens: int | None,
            seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Training blocks from the documents in a seeded order; held-out blocks in id order."""
    train_docs: list[Document] = list(split.train)
    random.Random(seed).shuffle(train_docs)
    heldout = token_stream(split.heldout, tokenizer)
    if eval_max_tokens is not None:
        heldout = heldout[:eval_max_tokens]
    return (pack(token_stream(train_docs, tokenizer), block, keep_tail=False),
            pack(heldout, block, keep_tail=True))


def perplexity(model: Any, blocks: list[list[int]], batch_size: int, device: str,
               advance: Callable[[int, int], None] | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of the blocks."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            chunk = blocks[start : start + batch_size]
            width = max(len(b) for b in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, b in enumerate(chunk):
                ids[i, : len(b)] = torch.tensor(b)
                mask[i, : len(b)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
            if advance:
                advance(min(start + batch_size, len(blocks)), len(blocks))
    if count == 0:
        raise FinetuneError("the held-out documents have no tokens to score")
    return math.exp(nll / count)


def train_adapter(model: Any, blocks: list[list[int]], project: LlmProject, device: str,
                  log: _MetricBuffer, advance: Callable[[int, int], None]) -> tuple[list[float], float]:
    """AdamW on the adapter's parameters, linear warm-up then linear decay; loss per step."""
    import torch

    t = project.config.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        return max(0.0, (t.steps - step) / max(1, t.steps - t.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order: list[int] = []
    generator = torch.Generator().manual_seed(t.seed)
    data = torch.tensor(blocks, dtype=torch.long)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(1, t.steps + 1):
        while len(order) < t.batch_size:  # epochs of a seeded shuffle, as many as the steps need
            order += torch.randperm(len(blocks), generator=generator).tolist()
        batch, order = data[order[: t.batch_size]].to(device), order[t.batch_size :]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FinetuneError(f"the loss is {float(loss)} at step {step}: lower training.learning_rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        log.add(step, {"loss": losses[-1], "learning_rate": float(scheduler.get_last_lr()[0])})
        advance(step, t.steps)
    elapsed = time.perf_counter() - started
    log.flush()
    model.eval()
    return losses, elapsed


class _MetricBuffer:
    """Per-step metrics to MLflow in small batches: a crash loses at most the last few seconds."""

    def __init__(self, registry: Registry, run_id: str, every_s: float = 5.0):
        self.registry, self.run_id, self.every_s = registry, run_id, every_s
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.last = time.monotonic()

    def add(self, step: int, values: dict[str, float]) -> None:
        self.pending.append((step, values))
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        for step, values in self.pending:
            self.registry.log_metrics(self.run_id, values, step=step)
        self.pending, self.last = [], time.monotonic()


def generate_samples(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                     device: str) -> list[str]:
    """Greedy continuations of the fixed prompts (deterministic: comparable before and after)."""
    import torch

    out = []
    model.eval()
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def _champion_perplexity(registry: Registry, champion: int, base: BaseFiles, model: Any,
                         eval_blocks: list[list[int]], batch_size: int, device: str,
                         tmp: Path) -> tuple[float | None, str | None]:
    """The champion adapter on the same base and held-out blocks; or why it cannot be compared."""
    info = registry.version(champion)
    ref_text = info.run_tags.get(BASE_REF_TAG)
    if ref_text is None:
        return None, f"the champion v{champion} is not a LoRA adapter; promote by hand if intended"
    champ_ref = BaseRef.from_json(ref_text)
    if champ_ref.weights_sha256 != base.ref.weights_sha256:
        return None, (f"the champion v{champion} adapts another base model ({champ_ref.base_model}); "
                      "perplexities over different bases (and tokenizers) are not comparable: "
                      "promote by hand (flywheel promote) if the new base is intended")
    folder = registry.download_verified(champion, tmp / "champion")
    model.load_adapter(str(folder), adapter_name="champion")
    try:
        model.set_adapter("champion")
        return perplexity(model, eval_blocks, batch_size, device), None
    finally:
        model.set_adapter("default")
        model.delete_adapter("champion")


def _log_pictures_and_text(registry: Registry, run_id: str, losses: list[float], before: float,
                           after: float, generations: list[dict[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = list(range(1, len(losses) + 1))
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, label="training loss (per step)")
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", label=f"training loss ({k}-step mean)")
        ax.axhline(math.log(before), color="tab:red", ls="--",
                   label=f"held-out loss before (ppl {before:.2f})")
        ax.axhline(math.log(after), color="tab:green", ls="--",
                   label=f"held-out loss after (ppl {after:.2f})")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="LoRA fine-tuning")
        ax.legend()
        fig.tight_layout()
        png = Path(tmp) / "loss.png"
        fig.savefig(png, dpi=100)
        plt.close(fig)
        registry.log_artifact(run_id, png)
    registry.log_text(run_id, json.dumps(generations, indent=2, ensure_ascii=False), "generations.json")
    lines = ["# Generations for the fixed prompts (greedy)", ""]
    for g in generations:
        lines += [f"## {g['prompt']}", "", "**before:** " + g["before"].replace("\n", " "), "",
                  "**after:** " + g["after"].replace("\n", " "), ""]
    registry.log_text(run_id, "\n".join(lines), "generations.md")
