"""LoRA fine-tuning end to end on a tiny model: train, track, register, gate, export, publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import LlmProject, load_llm_project
from flywheel.lifecycle.status import project_status
from flywheel.llm.finetune import FinetuneResult, finetune
from flywheel.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from tests.tiny_llm import build_tiny_model, tiny_config, write_config

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("llm-test_finetune")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base") / "model")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> tuple[LlmProject, FinetuneResult]:
    folder = tmp_path_factory.mktemp("lora")
    path = write_config(folder, tiny_config(tiny_base))
    project = load_llm_project(path, env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    return project, finetune(project)


def in_process(*args: str, env: dict[str, str] | None = None) -> Result:
    """The command in this process: for failure paths, which need no process of their own."""
    return CliRunner().invoke(app, list(args), env=env)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


Trained = tuple[LlmProject, FinetuneResult]


def test_finetune_lowers_heldout_perplexity_and_is_tracked(trained: Trained) -> None:
    project, r = trained
    assert r.perplexity_after < 0.8 * r.perplexity_before
    assert r.gate.passed and r.promoted and r.champion_version is None
    assert 0 < r.trainable_parameters < r.total_parameters
    registry = Registry.for_project(project)
    assert registry.alias_version(CHAMPION) == r.version == registry.alias_version(CHALLENGER)
    run = registry.client.get_run(r.run_id)
    assert run.data.params["lora.r"] == "8" and run.data.params["training.steps"] == "40"
    assert float(run.data.params["training.learning_rate"]) == 0.01
    assert run.data.metrics["perplexity_before"] == pytest.approx(r.perplexity_before)
    loss = registry.client.get_metric_history(r.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 41))
    assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx(r.losses)
    files = {a.path for a in registry.client.list_artifacts(r.run_id)}
    assert {"adapter", "generations.json", "generations.md", "loss.png"} <= files
    adapter = {a.path for a in registry.client.list_artifacts(r.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    gens = json.loads(Path(registry.client.download_artifacts(r.run_id, "generations.json")).read_text())
    assert [g["prompt"] for g in gens] == ["Article 14:", "The State shall"]
    assert all(set(g) == {"prompt", "before", "after"} for g in gens)


def test_status_json_shows_perplexities(trained: tuple[LlmProject, FinetuneResult]) -> None:
    project, r = trained
    done = cli("status", "--config", str(project.path), "--json",
               env={"FLYWHEEL_HOME": str(project.home)})
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    assert st["kind"] == "lora" and st["gate_metric"] == "perplexity"
    m = st["champion"]["metrics"]
    assert m["perplexity_before"] == pytest.approx(r.perplexity_before)
    assert m["perplexity_after"] == pytest.approx(r.perplexity_after)
    assert st["champion"]["version"] == r.version and st["champion"]["model_type"] == "lora"
    assert st["champion_history"][-1]["version"] == r.version


def test_gate_scores_the_champion_on_the_same_heldout(trained: tuple[LlmProject, FinetuneResult],
                                                      tmp_path: Path) -> None:
    """A one-step challenger is worse than the champion on the same held-out blocks: refused."""
    project, first = trained
    env = {"FLYWHEEL_HOME": str(project.home), "FLYWHEEL_TRAINING__STEPS": "1"}
    weak = finetune(load_llm_project(project.path, env=env))
    assert weak.champion_version == first.version
    # the champion's perplexity recomputed by the gate equals the one its own run logged
    assert weak.champion_perplexity == pytest.approx(first.perplexity_after, rel=1e-5)
    assert weak.perplexity_after > weak.champion_perplexity
    assert not weak.gate.passed and not weak.promoted
    assert any("improvement" in reason and "FAILS" in reason for reason in weak.gate.reasons)
    registry = Registry.for_project(project)
    assert registry.alias_version(CHAMPION) == first.version
    assert registry.alias_version(CHALLENGER) == weak.version
    assert registry.version(weak.version).tags["gate"] == "failed"
    status = project_status(project)
    assert status.challenger.metrics["champion_perplexity"] == pytest.approx(first.perplexity_after,
                                                                                rel=1e-5)


def check_model_card(readme: str, version: int) -> None:
    """The Hugging Face model card: YAML metadata, then what was trained on what, and how well."""
    import yaml

    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"flywheel", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a base from a local folder has no Hub name
    for section in ("## Training", "## Evaluation", "## Gate decision", "## Intended use and known limits"):
        assert section in readme
    assert f"v{version}" in readme and "| this fine-tune |" in readme and "**passed**" in readme


def test_merged_export_loads_in_plain_transformers_with_parity(
        trained: tuple[LlmProject, FinetuneResult], tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, r = trained
    out = tmp_path / "merged"
    done = cli("export", "--config", str(project.path), "--merge", "--version", str(r.version),
               "--output", str(out), env={"FLYWHEEL_HOME": str(project.home)})
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "flywheel.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    check_model_card((out / "README.md").read_text(), r.version)
    registry = Registry.for_project(project)
    logged = {Path(a.path).name for a in registry.client.list_artifacts(r.run_id, "card")}
    assert logged == {"model_card.md", "model_card.html"}  # logged at fine-tuning, after the gate
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    adapter = registry.download_verified(r.version, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(Path(project.config.base_model))
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = tokenizer(["Article 19: Protection of certain rights regarding freedom of speech"],
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(Path(project.config.base_model)).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert float((a - plain).abs().max()) > 1e-2  # the adapter changed the model: parity is not vacuous

    # a second export into the same folder is refused unless asked for
    again = cli("export", "--config", str(project.path), "--merge", "--output", str(out),
                env={"FLYWHEEL_HOME": str(project.home)})
    assert again.returncode == 1 and "--overwrite" in again.stderr


def transformers_greedy(folder: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new,
                             attention_mask=torch.ones_like(ids), pad_token_id=model.config.eos_token_id)
    return [t for t in out[0, len(prompt_ids):].tolist() if t != model.config.eos_token_id]


def llama_cpp_greedy(gguf: Path, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    from flywheel.llm.llamacpp import open_model

    llm = open_model(gguf, 256, 2)
    got: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token == eos or len(got) == max_new:
            break
        got.append(int(token))
    llm.close()
    return got


def test_gguf_export_decodes_transformers_own_greedy_tokens(trained: Trained, tmp_path: Path) -> None:
    """The merged model as GGUF (llama.cpp's format, written with the gguf package): llama.cpp's
    greedy tokens equal transformers' on the merged folder, at f32 and f16; the file's hash is
    recorded; q8_0, q4_0, q4_k_m and iq4_nl (the last two by llama.cpp's own quantiser) load and
    generate."""
    from transformers import AutoTokenizer

    from flywheel.registry import file_sha256

    project, r = trained
    prompts = ["Article 21: Protection of life", "The State shall not deny", "Article 14:"]
    for precision in ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl"):
        out = tmp_path / precision
        done = cli("export", "--config", str(project.path), "--merge", "--format", "gguf", "--precision",
                   precision, "--output", str(out), env={"FLYWHEEL_HOME": str(project.home)})
        assert done.returncode == 0, done.stderr
        gguf = out / f"model-{precision}.gguf"
        recorded = json.loads((out / "flywheel.json").read_text())["gguf"][gguf.name]
        assert recorded == {"precision": precision, "sha256": file_sha256(gguf)}
        if precision in ("q4_k_m", "iq4_nl"):  # by llama.cpp's quantiser, which records its file type
            import gguf as gguf_py

            file_type = gguf_py.GGUFReader(gguf).fields["general.file_type"]
            expected = {"q4_k_m": gguf_py.LlamaFileType.MOSTLY_Q4_K_M,
                        "iq4_nl": gguf_py.LlamaFileType.MOSTLY_IQ4_NL}[precision]
            assert int(file_type.parts[file_type.data[0]][0]) == expected
            assert not list(out.glob("*.partial"))  # the f16 it quantised from is gone
            assert "llama_model_quantize" not in done.stderr  # its per-tensor log kept quiet
        tokenizer = AutoTokenizer.from_pretrained(out)
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            got = llama_cpp_greedy(gguf, ids, 24, tokenizer.eos_token_id)
            if precision in ("q8_0", "q4_0", "q4_k_m", "iq4_nl"):
                assert got, prompt  # quantised weights: it runs; its cost is measured, not assumed away
                continue
            assert got == transformers_greedy(out, ids, 24), (precision, prompt)
    refused = cli("export", "--config", str(project.path), "--format", "gguf", "--output",
                  str(tmp_path / "no-merge"), env={"FLYWHEEL_HOME": str(project.home)})
    assert refused.returncode != 0 and "--merge" in refused.stdout + refused.stderr


def test_adapter_export_and_tampering_refused(trained: tuple[LlmProject, FinetuneResult],
                                              tmp_path: Path) -> None:
    from flywheel.llm.export import ExportError, export_version

    project, r = trained
    done = export_version(project, tmp_path / "adapter", merge=False, version=r.version)
    assert {"adapter_model.safetensors", "adapter_config.json", "flywheel.json"} <= set(done.files)
    # --overwrite replaces an earlier export, and never a folder of something else
    (tmp_path / "adapter" / "stale.txt").write_text("from the earlier export")
    again = export_version(project, tmp_path / "adapter", merge=False, version=r.version, overwrite=True)
    assert "stale.txt" not in again.files and "flywheel.json" in again.files
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a Flywheel export"):
        export_version(project, precious, merge=False, version=r.version, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    # change one byte of the stored adapter: nothing may load it any more
    registry = Registry.for_project(project)
    store = Path(registry.client.get_run(r.run_id).info.artifact_uri.removeprefix("file://"))
    weights = store / "adapter" / "adapter_model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(RegistryError, match="do not match the hashes"):
            registry.download_verified(r.version, tmp_path / "again")
    finally:
        weights.write_bytes(original)


def test_publish_fails_clearly_without_token_or_hub(trained: tuple[LlmProject, FinetuneResult]) -> None:
    from tests.conftest import free_port

    project, _ = trained
    base = {"FLYWHEEL_HOME": str(project.home), "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""}
    args = ("publish", "--config", str(project.path), "--repo-id", "someone/tiny-lora")
    no_token = cli(*args, env=base)
    assert no_token.returncode == 1 and "no HuggingFace token" in no_token.stderr
    offline = cli(*args, env={**base, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE" in offline.stderr
    # a token and no reachable hub (nothing listens on this port): a failure, never "published"
    unreachable = cli(*args, env={**base, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
                                  "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 1, unreachable.stdout
    assert "could not reach the HuggingFace Hub" in unreachable.stderr
    assert "published" not in unreachable.stdout
    # with the GGUF file: exported first (the precision checked), then the same honest failure
    with_gguf = cli(*args, "--gguf", "q8_0", env={**base, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
                                                  "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert with_gguf.returncode == 1 and "could not reach the HuggingFace Hub" in with_gguf.stderr
    wrong = cli(*args, "--gguf", "q2_k", env={**base, "HF_TOKEN": "hf_fake"})
    assert wrong.returncode != 0 and "f32, f16, q8_0, q4_0, q4_k_m, iq4_nl" in wrong.stderr


def test_config_errors_are_named(tmp_path: Path, tiny_base: Path) -> None:
    from flywheel.config import ConfigError, load_project

    bad = tiny_config(tiny_base, lora={"r": 0}, gate={"floor": 0.5})
    path = write_config(tmp_path / "bad", bad)
    with pytest.raises(ConfigError) as err:
        load_llm_project(path, env={})
    assert "lora.r" in str(err.value) and "gate.floor" in str(err.value)
    good = write_config(tmp_path / "good", tiny_config(tiny_base))
    with pytest.raises(ConfigError, match="LoRA fine-tuning project"):
        load_project(good, env={})
    done = in_process("train", "--config", str(good))
    assert done.exit_code == 2 and "finetune" in done.stderr


def test_text_split_is_by_document_and_stable(tiny_base: Path, tmp_path: Path) -> None:
    from flywheel.config import TextConfig
    from flywheel.llm.text import Document, pack, split_documents

    docs = [Document(str(i), f"text {i}") for i in range(400)]
    cfg = TextConfig(source="file", path="x", heldout_fraction=0.1)
    a = split_documents(docs, cfg, "h")
    b = split_documents(list(reversed(docs)), cfg, "h")
    assert {d.id for d in a.heldout} == {d.id for d in b.heldout}
    assert not {d.id for d in a.heldout} & {d.id for d in a.train}
    assert 20 <= len(a.heldout) <= 60
    other = split_documents(docs, cfg.model_copy(update={"split_salt": "other"}), "h")
    assert {d.id for d in other.heldout} != {d.id for d in a.heldout}
    assert pack(list(range(10)), 4, keep_tail=False) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack(list(range(10)), 4, keep_tail=True)[-1] == [8, 9]


def test_finetune_cli_shows_progress_and_result(tiny_base: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "p", tiny_config(tiny_base, training={"steps": 3}))
    done = cli("finetune", "--config", str(path), env={"FLYWHEEL_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "Train the LoRA adapter (3 steps" in done.stderr
    assert "held-out perplexity" in done.stdout and "champion → v1" in done.stdout
    missing = write_config(tmp_path / "q", tiny_config(tiny_base, text={"path": "/nonexistent.jsonl"}))
    fail = in_process("finetune", "--config", str(missing), env={"FLYWHEEL_HOME": str(tmp_path / "home2")})
    assert fail.exit_code == 1 and "no such file" in fail.stderr


def test_hub_id_base_from_the_offline_cache(tiny_base: Path, tmp_path: Path) -> None:
    """A hub id resolves through the HuggingFace cache when offline; a missing one fails clearly."""
    import shutil

    cache = tmp_path / "hf-cache"
    repo = cache / "models--flywheel-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_base.iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    path = write_config(tmp_path / "p", tiny_config("flywheel-test/tiny-llama", training={"steps": 2}))
    done = cli("finetune", "--config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    info = Registry.for_project(load_llm_project(path, env=env)).version(1)
    ref = json.loads(info.run_tags["base_ref"])
    assert ref["kind"] == "hub" and ref["base_model"] == "flywheel-test/tiny-llama"
    missing = write_config(tmp_path / "q", tiny_config("flywheel-test/not-cached"))
    fail = in_process("finetune", "--config", str(missing),
                      env={**env, "FLYWHEEL_HOME": str(tmp_path / "h2")})
    assert fail.exit_code == 1 and "nor in the local HuggingFace cache" in " ".join(fail.stderr.split())
