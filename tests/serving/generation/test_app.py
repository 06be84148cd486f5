"""`flywheel serve` on a LoRA project: /v1/generate over real HTTP, against transformers' own output."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.config import LlmProject, load_llm_project
from flywheel.lifecycle.aliases import promote
from flywheel.llm.finetune import finetune
from tests.conftest import ServerProcess
from tests.tiny_llm import build_tiny_model, openai_client, reference_generation, tiny_config, write_config

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("serving-test_generate")

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> LlmProject:
    """Two registered adapters: v1 (40 steps, champion) and v2 (a different seed, by hand later)."""
    base = build_tiny_model(tmp_path_factory.mktemp("tiny-base") / "model")
    folder = tmp_path_factory.mktemp("lora-serve")
    cfg = tiny_config(base, serving={"max_concurrent": 1, "max_waiting": 1, "max_per_client": 2,
                                     "reload_interval_s": 0.5,
                                     "max_new_tokens": 64, "default_max_new_tokens": 8,
                                     "max_prompt_tokens": 64, "max_body_bytes": 2048})
    path = write_config(folder, cfg)
    env = {"FLYWHEEL_HOME": str(folder / ".flywheel")}
    p = load_llm_project(path, env=env)
    finetune(p)
    # v2: another seed and fewer steps; registered as challenger (the gate refuses it)
    finetune(load_llm_project(path, env={**env, "FLYWHEEL_TRAINING__STEPS": "5",
                                         "FLYWHEEL_TRAINING__SEED": "11"}))
    return p


@pytest.fixture(scope="module")
def server(project: LlmProject) -> Iterator[ServerProcess]:
    srv = ServerProcess(project, env={"FLYWHEEL_ADMIN_TOKEN": TOKEN,  # type: ignore[arg-type]
                                      "FLYWHEEL_ROOM__MOUNT_ON_SERVE": "true"})
    try:
        yield srv
    finally:
        srv.stop()


def test_generation_equals_transformers_own(server: ServerProcess, project: LlmProject,
                                            tmp_path: Path) -> None:
    prompt = "Article 21: Protection of life"
    for temperature, seed in ((0.0, 0), (0.9, 1234), (1.3, 99)):
        body = {"prompt": prompt, "max_new_tokens": 24, "temperature": temperature, "seed": seed}
        r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["version"] == 1 and got["model"] == "tiny-lora"
        assert got["usage"]["completion_tokens"] >= 1
        expected = reference_generation(project, tmp_path, 1, prompt, 24, temperature, seed)
        assert got["text"] == expected, (temperature, seed)
    # the same seed gives the same sample twice; another seed (almost surely) another one
    body = {"prompt": prompt, "max_new_tokens": 24, "temperature": 1.3, "seed": 5}
    a, b = (httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()["text"] for _ in range(2))
    c = httpx.post(f"{server.url}/v1/generate", json={**body, "seed": 6}, timeout=60).json()["text"]
    assert a == b and a != c


@pytest.mark.parametrize(("body", "loc"), [
    ({}, ["body", "prompt"]),
    ({"prompt": ""}, ["body", "prompt"]),
    ({"prompt": 3}, ["body", "prompt"]),
    ({"prompt": "x", "max_new_tokens": 65}, ["body", "max_new_tokens"]),
    ({"prompt": "x", "max_new_tokens": 0}, ["body", "max_new_tokens"]),
    ({"prompt": "x", "max_new_tokens": 2.5}, ["body", "max_new_tokens"]),
    ({"prompt": "x", "temperature": -0.1}, ["body", "temperature"]),
    ({"prompt": "x", "temperature": 1e-300}, ["body", "temperature"]),
    ({"prompt": "x", "temperature": 2.5}, ["body", "temperature"]),
    ({"prompt": "x", "temperature": True}, ["body", "temperature"]),
    ({"prompt": "x", "top_p": 0}, ["body", "top_p"]),
    ({"prompt": "x", "seed": -1}, ["body", "seed"]),
    ({"prompt": "x", "stream": True}, ["body", "stream"]),
    ({"prompt": "Article " * 60}, ["body", "prompt"]),  # over max_prompt_tokens (64)
])
def test_invalid_requests_name_the_field(server: ServerProcess, body: dict[str, object],
                                         loc: list[str]) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_the_room_on_the_server_counts_generations_and_shows_the_lora_card(server: ServerProcess) -> None:
    """Generations and refusals land in the per-minute rollups the room's traffic charts read."""
    deadline = time.monotonic() + 30
    while True:
        totals = httpx.get(f"{server.url}/room/api/traffic").json()["totals"].get("1", {})
        if totals.get("requests", 0) >= 1 and totals.get("client_errors", 0) >= 1:
            break
        assert time.monotonic() < deadline, totals
        time.sleep(0.5)
    page = httpx.get(f"{server.url}/room/")
    assert page.status_code == 200 and "serving v1" in page.text
    card = httpx.get(f"{server.url}/room/cards/1")
    assert card.status_code == 200
    assert "Gate decision" in card.text and "Held-out perplexity" in card.text


def test_bounds_body_size_nan_and_admin(server: ServerProcess) -> None:
    big = httpx.post(f"{server.url}/v1/generate", content=b'{"prompt": "' + b"a" * 4000 + b'"}',
                     headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413
    nan = httpx.post(f"{server.url}/v1/generate", content=b'{"prompt": "x", "temperature": NaN}',
                     headers={"content-type": "application/json"}, timeout=30)
    assert nan.status_code == 422 and ["body", "temperature"] in [e["loc"] for e in nan.json()["detail"]]
    assert httpx.post(f"{server.url}/admin/reload", timeout=30).status_code == 401
    wrong = httpx.post(f"{server.url}/admin/reload", headers={"authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    ok = httpx.post(f"{server.url}/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["version"] == 1
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["max_new_tokens"]["maximum"] == 64
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"][0]
    assert models["merged"] is True and models["lineage"]["perplexity_after"] > 0


def test_concurrency_limit_answers_429_and_counts(server: ServerProcess) -> None:
    """One generation at a time, one waiting: of 6 at once, some are refused, none fail otherwise."""
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        r = httpx.post(f"{server.url}/v1/generate", timeout=120,
                       json={"prompt": "Article 1", "max_new_tokens": 64, "temperature": 1.0, "seed": 1})
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    rejected = [line for line in metrics.splitlines()
                if line.startswith("flywheel_generations_rejected_total")]
    assert rejected and float(rejected[0].split()[-1]) >= statuses.count(429)
    assert 'flywheel_requests_total{endpoint="generate",model_version="1",status="200"}' in metrics
    assert "flywheel_generated_tokens_total" in metrics


def test_hot_swap_under_load_fails_nothing(server: ServerProcess, project: LlmProject) -> None:
    """Promote v2, then roll back to v1, while clients generate: every request answers 200 or 429."""
    stop = threading.Event()
    seen: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "Article 5", "max_new_tokens": 4},
                           timeout=120)
            with lock:
                if r.status_code == 200:
                    seen[r.json()["version"]] = seen.get(r.json()["version"], 0) + 1
                elif r.status_code != 429:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for target in (2, 1):
            promote(project, target, reason="swap test")
            deadline = time.monotonic() + 60
            while server.served_version() != target and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.served_version() == target
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert seen.get(2, 0) > 0 and seen.get(1, 0) > 0, seen
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    swaps = [line for line in metrics.splitlines() if line.startswith("flywheel_model_swaps_total")]
    assert swaps and float(swaps[0].split()[-1]) >= 2


def test_two_workers_share_metrics_and_follow_the_champion(project: LlmProject) -> None:
    srv = ServerProcess(project, workers=2)  # type: ignore[arg-type]
    try:
        for _ in range(8):
            r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "Article 3", "max_new_tokens": 3},
                           timeout=60)
            assert r.status_code == 200, r.text
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        counts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('flywheel_requests_total{endpoint="generate"')]
        assert sum(counts) == 8  # summed over both workers' files
        versions = [line for line in metrics.splitlines() if line.startswith("flywheel_model_version{")]
        pids = {line.split('pid="')[1].split('"')[0] for line in versions}
        assert len(pids) == 2, versions
    finally:
        srv.stop()


# ---- the OpenAI-compatible endpoints, through the official client ------------------------------

def test_the_openai_client_gets_transformers_own_tokens(server: ServerProcess, project: LlmProject,
                                                        tmp_path: Path) -> None:
    client = openai_client(server)
    assert [m.id for m in client.models.list()] == ["tiny-lora"]
    prompt = "Article 21: Protection of life"
    expected = reference_generation(project, tmp_path, 1, prompt, 20, 0.0, 0)
    done = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=20, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text == expected
    assert done.usage is not None and done.usage.completion_tokens == 20
    assert done.choices[0].finish_reason == "length"
    # chat: the tokenizer's chat template, then the same greedy decoding
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Article 14"}]
    templated = "system: Answer briefly.\nuser: Article 14\nassistant:"
    chat = client.chat.completions.create(model="tiny-lora", messages=messages, max_tokens=16, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    expected_chat = reference_generation(project, tmp_path, 1, templated, 16, 0.0, 0)
    assert chat.choices[0].message.content == expected_chat
    # seeded sampling repeats; another seed (almost surely) differs
    sample = [client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=20, temperature=1.2,
                                        seed=s).choices[0].text for s in (5, 5, 6)]
    assert sample[0] == sample[1] != sample[2]


def test_streams_and_stop_strings_give_the_same_text(server: ServerProcess) -> None:
    client = openai_client(server)
    prompt = "Article 19: Protection of certain rights"
    whole = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=30, temperature=0)
    text = whole.choices[0].text
    pieces = list(client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=30, temperature=0,
                                            stream=True))
    assert len(pieces) > 3 and "".join(p.choices[0].text for p in pieces) == text
    assert pieces[-1].choices[0].finish_reason == "length"
    # a stop string: the text up to it, finish_reason stop (the generated text only: this
    # prompt ends in "s", and the tiny model answers "sss…")
    probe = "Article 21: Protection of life"
    greedy = {"model": "tiny-lora", "max_tokens": 30, "temperature": 0}
    text = client.completions.create(prompt=probe, **greedy).choices[0].text
    stop, cut = "sss", text.index("sss")
    assert cut > 0, text
    stopped = client.completions.create(model="tiny-lora", prompt=probe, max_tokens=30, temperature=0,
                                        stop=[stop, "\u2603never"])
    assert stopped.choices[0].text == text[:cut], (text, stopped.choices[0].text)
    assert stopped.choices[0].finish_reason == "stop"
    early = client.completions.create(prompt=prompt, stop="sss", **greedy)
    assert early.choices[0].text == "" and early.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="tiny-lora", messages=[{"role": "user", "content": prompt}], max_tokens=30, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=30, temperature=0)
    assert content == plain.choices[0].message.content
    assert plain.usage is not None and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    streamed_stop = list(client.completions.create(model="tiny-lora", prompt=probe, max_tokens=30,
                                                   temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed_stop) == text[:cut]
    assert streamed_stop[-1].choices[0].finish_reason == "stop"


def test_openai_errors_name_the_field(server: ServerProcess) -> None:
    import openai

    client = openai_client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4o", prompt="x")
    assert missing.value.code == "model_not_found"
    for kwargs, param in (({"temperature": 5}, "temperature"), ({"max_tokens": 65}, "max_tokens"),
                          ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                          ({"stop": "x" * 101}, "stop"),
                          ({"extra_body": {"tools": []}}, "tools")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny-lora", prompt="x", **kwargs)
        assert bad.value.param == param, (kwargs, bad.value.body)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "wizard", "content": "x"}])
    assert bad.value.param == "messages.0"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * 5000, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'endpoint="completions"' in metrics and 'endpoint="chat_completions"' in metrics
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["properties"]["max_tokens"]["maximum"] == 64 and "model" in schema["required"]


def test_streams_that_are_dropped_or_refused_keep_no_slot(server: ServerProcess) -> None:
    """Clients that close a stream early (or before it starts) leave the slot free; a stream
    asked for while every slot and the queue are busy is a 429 before any event."""
    body = {"model": "tiny-lora", "prompt": "Article 1", "max_tokens": 64, "temperature": 1.0, "seed": 1,
            "stream": True}
    for _ in range(4):  # max_concurrent is 1: a leaked slot would stall everything after
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then the connection goes away
    for _ in range(3):  # the request sent, the connection closed before any answer
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.05)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def stream() -> None:
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        with lock:
            answers.append(r)

    clients = [threading.Thread(target=stream) for _ in range(6)]  # one runs, one waits, the rest: 429
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 1, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
    # a stream that passed the check but found the last waiting place taken before it started (two
    # requests racing for it) says so in its one event; every other stream ends with [DONE]
    raced = '"type": "rate_limit_error"'
    assert all(r.text.rstrip().endswith("data: [DONE]") or (raced in r.text and r.text.count("data:") == 1)
               for r in answers if r.status_code == 200), [r.text[-200:] for r in answers]
    done = openai_client(server).completions.create(model="tiny-lora", prompt="Article 1", max_tokens=4,
                                                    temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")  # a slot is still there to take
