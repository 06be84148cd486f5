"""`flywheel export` and `flywheel publish`: a registered adapter as files others can use.

`export --merge` writes base + adapter merged into one model folder (config.json,
model.safetensors, tokenizer files, generation config, a model card) that plain `transformers`
loads with `AutoModelForCausalLM.from_pretrained(folder)`. Without `--merge` it writes the PEFT
adapter folder (adapter_config.json + adapter_model.safetensors) and the base reference.
`publish` exports merged (with `--gguf`, the GGUF file too) and uploads the folder to the
HuggingFace Hub; it needs a token and a reachable hub and fails with a message saying which is
missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import LlmProject
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import require
from flywheel.llm.base import BASE_REF_TAG, BaseRef, base_for_ref, load_tokenizer, merge_adapter
from flywheel.llm.card import lora_card
from flywheel.llm.gguf_export import Precision, write_gguf
from flywheel.registry import CHAMPION, Registry, RegistryError


class ExportError(FlywheelError):
    """The export or the upload could not be done; the message says why."""


@dataclass(frozen=True)
class Exported:
    folder: Path
    version: int
    merged: bool
    files: list[str]


def export_version(project: LlmProject, output: Path, merge: bool, version: int | None = None,
                   overwrite: bool = False, gguf: Precision | None = None) -> Exported:
    """The adapter, or the merged model (and, with `gguf`, the same model as one GGUF file at
    that precision for llama.cpp, its sha256 in flywheel.json)."""
    require("llm", "flywheel export")
    if gguf is not None and not merge:
        raise ExportError("a GGUF file is of the merged model: pass --merge with --format gguf")
    registry = Registry.for_project(project)
    version = _version(registry, version)
    info = registry.version(version)
    ref_text = info.run_tags.get(BASE_REF_TAG)
    if ref_text is None:
        raise ExportError(f"{registry.model_name} v{version} is not a LoRA adapter")
    ref = BaseRef.from_json(ref_text)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ExportError(f"{output} exists and is not empty; pass --overwrite or another --output")
        if not (output / "flywheel.json").is_file():  # --overwrite replaces an export, nothing else
            raise ExportError(f"{output} holds files that are not a Flywheel export (no flywheel.json); "
                              "--overwrite replaces only an earlier export: choose another --output")
    work = output.parent / f".{output.name}.partial-{os.getpid()}"
    files: dict[str, dict[str, str]] = {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = registry.download_verified(version, Path(tmp))
            if merge:
                base = base_for_ref(project, ref)
                merge_adapter(base.folder, adapter).save_pretrained(work)  # safetensors
                load_tokenizer(base.folder).save_pretrained(work)
                if gguf is not None:
                    name = f"model-{gguf}.gguf"
                    files = {name: {"precision": gguf, "sha256": write_gguf(
                        work, work / name, gguf, f"{registry.model_name}-v{version}")}}
            else:
                for f in adapter.iterdir():
                    shutil.copy2(f, work / f.name)
        (work / "flywheel.json").write_text(json.dumps({
            "model": registry.model_name, "version": version, "run_id": info.run_id,
            "merged": merge, "base": json.loads(ref.to_json()), "gguf": files,
            "metrics": {k: info.metrics[k] for k in ("perplexity_before", "perplexity_after")
                        if k in info.metrics}}, indent=2))
        (work / "README.md").write_text(lora_card(project, registry, version, merge))
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        if output.exists():  # the earlier export goes only once the new one is complete
            os.replace(output, old)
        os.replace(work, output)  # the folder appears whole or not at all
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Exported(output, version, merge, sorted(p.name for p in output.iterdir()))


def publish(project: LlmProject, repo_id: str, version: int | None = None, private: bool = True,
            token: str | None = None, gguf: Precision | None = None) -> str:
    """Export merged (with `gguf`, one GGUF file beside it) and upload to the Hub; returns the URL
    of the commit. Never fakes success."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ExportError("no HuggingFace token: set HF_TOKEN (a token with write access to "
                          f"{repo_id}); nothing was uploaded")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ExportError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to publish. "
                          "Nothing was uploaded")
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_version(project, Path(tmp) / "model", merge=True, version=version, gguf=gguf)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(exported.folder), repo_type="model",
                commit_message=f"{project.config.registered_model} v{exported.version} (Flywheel)")
        except OfflineModeIsEnabled:
            raise ExportError("the HuggingFace client is in offline mode; nothing was uploaded") from None
        except HfHubHTTPError as exc:
            raise ExportError(f"the Hub refused the upload to {repo_id}: {exc}") from None
        except Exception as exc:  # connection refused, DNS, TLS, timeouts (httpx2's own classes)
            raise ExportError(f"could not reach the HuggingFace Hub to publish {repo_id}: "
                              f"{type(exc).__name__}: {exc}. Nothing may have been uploaded; "
                              "check the network and HF_ENDPOINT") from None
    return str(getattr(commit, "commit_url", commit))


def _version(registry: Registry, version: int | None) -> int:
    if version is not None:
        return version
    champion = registry.alias_version(CHAMPION)
    if champion is None:
        raise RegistryError(f"{registry.model_name} has no champion: pass --version or run flywheel "
                            "finetune first")
    return champion

