"""`serving.runtime: llama.cpp`: the GGUF export registered at fine-tuning, served over real HTTP,
against transformers' own tokens; the export's hashes, its perplexity in the gate, its rebuild."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.config import LlmProject, load_llm_project
from flywheel.lifecycle.aliases import promote
from flywheel.llm.finetune import finetune
from flywheel.llm.llamacpp import HASHES, ExportCost, load_llamacpp, served_export
from flywheel.registry import Registry, RegistryError, file_sha256
from tests.conftest import ServerProcess
from tests.tiny_llm import build_tiny_model, openai_client, reference_generation, tiny_config, write_config

pytestmark = pytest.mark.xdist_group("serving-test_generate_llamacpp")

SERVING = {"runtime": "llama.cpp", "precision": "f32", "threads": 1, "max_concurrent": 2,
           "max_waiting": 4, "reload_interval_s": 0.5, "max_new_tokens": 64, "default_max_new_tokens": 8,
           "max_prompt_tokens": 64}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> LlmProject:
    """v1 (champion) fine-tuned for the llama.cpp runtime at f32; v2 (another seed) by hand later."""
    base = build_tiny_model(tmp_path_factory.mktemp("tiny-base") / "model")
    folder = tmp_path_factory.mktemp("lora-llamacpp")
    path = write_config(folder, tiny_config(base, serving=SERVING))
    env = {"FLYWHEEL_HOME": str(folder / ".flywheel")}
    p = load_llm_project(path, env=env)
    first = finetune(p)
    assert first.promoted and first.served is not None
    finetune(load_llm_project(path, env={**env, "FLYWHEEL_TRAINING__STEPS": "5",
                                         "FLYWHEEL_TRAINING__SEED": "11"}))
    return p


@pytest.fixture(scope="module")
def server(project: LlmProject) -> Iterator[ServerProcess]:
    srv = ServerProcess(project)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()


def test_finetune_registers_the_export_and_gates_its_perplexity(project: LlmProject) -> None:
    registry = Registry.for_project(project)
    info = registry.version(1)
    hashes = registry.attached_hashes(1, "gguf-f32")
    assert {"model-f32.gguf", "tokenizer.json", "tokenizer_config.json"} <= set(hashes)
    served, full = info.metrics["perplexity_served"], info.metrics["perplexity_after"]
    # f32 through llama.cpp is the same model: the same perplexity up to float rounding
    assert abs(served / full - 1) < 1e-3, (served, full)
    assert info.metrics["served_perplexity_cost"] == pytest.approx(served / full - 1)
    assert "export: llama.cpp f32 held-out perplexity" in info.tags["gate_reasons"]
    assert "holds" in info.tags["gate_reasons"].split("export:")[1]


def test_export_cost_refuses_what_costs_more_than_the_limit() -> None:
    assert ExportCost("q8_0", 10.1, 10.0, 0.02).passed  # +1% within 2%
    refused = ExportCost("q8_0", 10.3, 10.0, 0.02)
    assert not refused.passed and "FAILS" in refused.reason() and "+3.00%" in refused.reason()
    assert ExportCost("q8_0", 13.0, 10.0, None).passed  # no limit: measured, never refused
    assert ExportCost("f16", 9.9, 10.0, 0.0).passed  # cheaper than full precision passes a zero limit


def test_greedy_tokens_equal_transformers_own(server: ServerProcess, project: LlmProject,
                                              tmp_path: Path) -> None:
    client = openai_client(server)
    for prompt in ("Article 21: Protection of life", "The State shall", "Article 14:"):
        expected = reference_generation(project, tmp_path, 1, prompt, 24, 0.0, 0)
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": prompt, "max_new_tokens": 24}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected and r.json()["version"] == 1
        done = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=24, temperature=0)
        assert done.choices[0].text == expected
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Article 14"}]
    chat = client.chat.completions.create(model="tiny-lora", messages=messages, max_tokens=16, temperature=0)
    templated = "system: Answer briefly.\nuser: Article 14\nassistant:"
    expected = reference_generation(project, tmp_path, 1, templated, 16, 0.0, 0)
    assert chat.choices[0].message.content == expected
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert "llama.cpp" in json.dumps(models), models


def test_streams_stops_and_seeds(server: ServerProcess) -> None:
    client = openai_client(server)
    prompt = "Article 19: Protection of certain rights"
    greedy = {"model": "tiny-lora", "max_tokens": 30, "temperature": 0}
    text = client.completions.create(prompt=prompt, **greedy).choices[0].text
    pieces = list(client.completions.create(prompt=prompt, stream=True, **greedy))
    assert len(pieces) > 3 and "".join(p.choices[0].text for p in pieces) == text
    probe = "Article 21: Protection of life"
    whole = client.completions.create(prompt=probe, **greedy).choices[0].text
    cut = whole.index("sss")
    stopped = client.completions.create(prompt=probe, stop=["sss"], **greedy).choices[0]
    assert stopped.text == whole[:cut] and stopped.finish_reason == "stop"
    streamed = list(client.completions.create(prompt=probe, stop="sss", stream=True, **greedy))
    assert "".join(p.choices[0].text for p in streamed) == whole[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    samples = [client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=20, temperature=1.2,
                                         seed=s).choices[0].text for s in (5, 5, 6)]
    assert samples[0] == samples[1] != samples[2]


def test_concurrent_requests_keep_their_own_context(server: ServerProcess) -> None:
    """Two contexts, six clients at once: every answer is the one that prompt gets alone."""
    prompts = ["Article 3", "Article 5: Citizenship", "The Parliament", "Article 12", "Article 9", "Union"]
    alone = {p: httpx.post(f"{server.url}/v1/generate", json={"prompt": p, "max_new_tokens": 16},
                           timeout=60).json()["text"] for p in prompts}
    got: dict[str, list[str]] = {p: [] for p in prompts}
    statuses: list[int] = []

    def client(prompt: str) -> None:
        for _ in range(3):
            r = httpx.post(f"{server.url}/v1/generate", json={"prompt": prompt, "max_new_tokens": 16},
                           timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 200:
                got[prompt].append(r.json()["text"])

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 12, statuses
    for p in prompts:
        assert all(text == alone[p] for text in got[p]), (p, got[p], alone[p])


def test_hot_swap_follows_the_champion(server: ServerProcess, project: LlmProject) -> None:
    promote(project, 2, reason="swap test")
    try:
        deadline = time.monotonic() + 60
        while server.served_version() != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.served_version() == 2
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "Article 5"}, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == 2
    finally:
        promote(project, 1, reason="swap back")
        deadline = time.monotonic() + 60
        while server.served_version() != 1 and time.monotonic() < deadline:
            time.sleep(0.2)


def test_a_changed_export_is_fetched_again_or_refused(project: LlmProject, tmp_path: Path) -> None:
    registry = Registry.for_project(project)
    folder = served_export(project, registry, 1)
    gguf = folder / "model-f32.gguf"
    good = file_sha256(gguf)
    with gguf.open("r+b") as fh:  # a corrupted local copy: downloaded again, never loaded
        fh.seek(4096)
        fh.write(b"\x00" * 64)
    assert file_sha256(served_export(project, registry, 1) / "model-f32.gguf") == good
    # the registered file itself changed: refused
    run_id = registry.version(1).run_id
    original = next(p for p in project.artifact_root.rglob("model-f32.gguf") if run_id in str(p))
    saved = tmp_path / "saved.gguf"
    shutil.copy2(original, saved)
    try:
        with original.open("r+b") as fh:
            fh.seek(4096)
            fh.write(b"\x01" * 64)
        shutil.rmtree(folder)
        with pytest.raises(RegistryError, match="do not match the hashes recorded"):
            served_export(project, registry, 1)
    finally:
        shutil.copy2(saved, original)


def test_a_version_without_an_export_is_built_where_it_is_served(project: LlmProject) -> None:
    """q8_0 was never registered: the server builds it from the hash-checked adapter and base,
    records its hashes, reuses it, and its greedy tokens start as f32's do."""
    q8 = load_llm_project(project.path, env={"FLYWHEEL_HOME": str(project.home),
                                             "FLYWHEEL_SERVING__PRECISION": "q8_0"})
    registry = Registry.for_project(q8)
    assert not registry.attached_hashes(1, "gguf-q8_0")
    folder = served_export(q8, registry, 1)
    recorded = json.loads((folder / HASHES).read_text())
    assert recorded["model-q8_0.gguf"] == file_sha256(folder / "model-q8_0.gguf")
    stamp = os.stat(folder / "model-q8_0.gguf").st_mtime_ns
    assert served_export(q8, registry, 1) == folder
    assert os.stat(folder / "model-q8_0.gguf").st_mtime_ns == stamp  # reused, not rebuilt
    generator = load_llamacpp(q8, registry, 1)
    out = generator.generate(generator.prompt_tokens("Article 21"), 12, 0.0, 1.0, None)
    assert out.completion_tokens >= 1 and out.prompt_tokens == len(generator.prompt_tokens("Article 21"))
    assert generator.describe()["precision"] == "q8_0"


def test_dropped_streams_give_their_context_back(server: ServerProcess) -> None:
    """Streams closed after their first event, four times over two contexts: a context not given
    back would leave the next generations waiting for ever."""
    body = {"model": "tiny-lora", "prompt": "Article 1", "max_tokens": 64, "temperature": 1.0, "seed": 1,
            "stream": True}
    for _ in range(4):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    def ask(answers: list[int]) -> None:
        body = {"prompt": "Article 2", "max_new_tokens": 8}
        answers.append(httpx.post(f"{server.url}/v1/generate", json=body, timeout=30).status_code)

    for _ in range(3):  # two at once need both contexts
        answers: list[int] = []
        both = [threading.Thread(target=ask, args=(answers,)) for _ in range(2)]
        for t in both:
            t.start()
        for t in both:
            t.join()
        assert answers == [200, 200]
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    busy = [line for line in metrics.splitlines() if line.startswith("flywheel_generations_in_progress")]
    assert busy and all(float(line.split()[-1]) == 0 for line in busy), busy
