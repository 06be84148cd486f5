"""The LoRA model on transformers, llama.cpp (f32, f16, q8_0, q4_0, q4_k_m, iq4_nl) and onnxruntime-genai
(fp32, int4), one run on one machine.

Part 1, each runtime in a process of its own (so that its peak memory is its own): the base
SmolLM2-135M-Instruct with a LoRA adapter (r=8 on q_proj/v_proj, random non-zero B, so it really
changes the weights) merged in, exported to GGUF by Flywheel's writer and, where onnxruntime-genai
is installed, to ONNX by its own model builder. Three fixed prompts, greedy, exactly `--tokens` new
tokens each: time to first token, decode tokens/s (after the first), end-to-end tokens/s, peak RSS
while loading and generating, and how many greedy tokens equal transformers' (the prefix that
matches, per prompt); then the held-out perplexity of each on the Constitution articles the example
project holds out (the same split and blocks as `flywheel finetune`). Speeds move by a fifth from
run to run on a shared machine, so every runtime runs `--rounds` times, interleaved (each round in
another order), and the table gives medians; "x decode" is the median of each round's ratio to
transformers in that round, with its range.

Part 2, over HTTP: a copy of the LoRA example fine-tuned for `--steps` steps (the speed of a
model does not depend on how long it trained), served by `flywheel serve` on each runtime with the
example's serving settings; 1 and 4 concurrent clients send greedy requests of `--http-tokens`
new tokens: requests/s, p50/p99 latency and generated tokens/s of /v1/chat/completions on both
runtimes and of /v1/generate on transformers (the endpoint there was before), and time to the
first streamed token.

    .venv/bin/python benchmarks/llm_runtimes.py [--tokens 128] [--rounds 3] [--steps 2] [--requests 6]
        [--part 1|2]
    (onnxruntime-genai rows: `pip install onnxruntime-genai onnx-ir` in the venv first)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flywheel.core.cpus import usable_cpus
from flywheel.serving.process import wait_ready

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "constitution-lora" / "flywheel.yaml"
PROMPTS = ["Article 21: Protection of life and personal liberty\n",
           "The Parliament of India consists of",
           "Article 14: Equality before law\n"]
PRECISIONS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl")
ONNX_PRECISIONS = ("fp32", "int4")  # onnxruntime-genai's builder: int4 is RTN, blocks of 32, int8 compute


def has_ortgenai() -> bool:
    try:
        import onnx_ir  # noqa: F401  (the builder needs it)
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def runtimes() -> list[str]:
    onnx = [f"onnxruntime-genai {p}" for p in ONNX_PRECISIONS] if has_ortgenai() else []
    return ["transformers", *(f"llama.cpp {p}" for p in PRECISIONS), *onnx]


# ---- part 1: one runtime per process ------------------------------------------------------------


def build_models(work: Path) -> Path:
    """The merged model folder and its GGUF file at each precision."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel.config import cache_dir
    from flywheel.llm.base import builtin_folder, load_model, load_tokenizer
    from flywheel.llm.gguf_export import write_gguf

    folder = builtin_folder(cache_dir())
    torch.manual_seed(0)
    model = get_peft_model(load_model(folder), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM")).merge_and_unload()
    merged = work / "merged"
    model.save_pretrained(merged)
    load_tokenizer(folder).save_pretrained(merged)
    for precision in PRECISIONS:
        write_gguf(merged, work / f"model-{precision}.gguf", precision)  # type: ignore[arg-type]
    if has_ortgenai():
        for precision in ONNX_PRECISIONS:
            build_onnx(merged, work / f"onnx-{precision}", precision)
    return merged


def build_onnx(merged: Path, out: Path, precision: str) -> None:
    """onnxruntime-genai's own model builder on the merged folder; its session set to every core
    (left unset, it decoded at about half the speed here)."""
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o",
                    str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "onnx-cache")],
                   check=True, capture_output=True)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = usable_cpus()
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))


def heldout_blocks() -> list[list[int]]:
    from flywheel.config import cache_dir, load_llm_project
    from flywheel.llm.base import builtin_folder, load_tokenizer
    from flywheel.llm.finetune import _blocks
    from flywheel.llm.text import load_split

    project = load_llm_project(EXAMPLE)
    t = project.config.training
    tokenizer = load_tokenizer(builtin_folder(cache_dir()))
    return _blocks(load_split(project), tokenizer, t.max_seq_length, t.eval_max_tokens, t.seed)[1]


def measure(runtime: str, work: Path, tokens: int, threads: int, quality: bool) -> dict[str, Any]:
    """In this process: generate the prompts, then (with `quality`) the held-out perplexity."""
    from flywheel.llm.base import load_tokenizer

    merged = work / "merged"
    tokenizer = load_tokenizer(merged)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    blocks = heldout_blocks() if quality else []
    extra: dict[str, Any] = {}
    if runtime == "transformers":
        generate, ppl = _transformers(merged, threads, blocks)
    elif runtime.startswith("llama.cpp"):
        from flywheel.llm.llamacpp import extra_buffers_work

        path = work / f"model-{runtime.split()[-1]}.gguf"
        extra["buffers"] = "repacked" if extra_buffers_work(path) else "plain"
        generate, ppl = _llamacpp(path, threads, blocks)
    else:
        generate, ppl = _ortgenai(work / f"onnx-{runtime.split()[-1]}", blocks)
    generate(prompts[0], 4)  # warm-up
    runs = [generate(ids, tokens) for ids in prompts]
    peak = _peak_rss_mb()  # loading and generating; the perplexity pass below holds more
    first = [r[0] for r in runs]
    total = [r[1] for r in runs]
    return {"runtime": runtime, "ttft_s": statistics.median(first),
            "decode_tps": (tokens - 1) * len(runs) / sum(t - f for f, t in zip(first, total, strict=True)),
            "e2e_tps": tokens * len(runs) / sum(total), "tokens": [r[2] for r in runs],
            "perplexity": ppl() if quality else None, "peak_rss_mb": peak, **extra}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would include the parent's, which
    survives the fork and exec that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _transformers(merged: Path, threads: int, blocks: list[list[int]]) -> tuple[Any, Any]:
    import torch
    from transformers import TextIteratorStreamer

    from flywheel.llm.base import load_model, load_tokenizer
    from flywheel.llm.finetune import perplexity

    torch.set_num_threads(threads)
    model, tokenizer = load_model(merged), load_tokenizer(merged)

    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        out: dict[str, Any] = {}
        start = time.perf_counter()
        worker = threading.Thread(target=lambda: out.update(ids=model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=tokenizer.eos_token_id, streamer=streamer)))
        worker.start()
        first = None
        for _ in streamer:
            first = first or time.perf_counter() - start
        worker.join()
        return first or 0.0, time.perf_counter() - start, out["ids"][0, len(ids):].tolist()

    return generate, lambda: perplexity(model, blocks, 4, "cpu")


def _llamacpp(path: Path, threads: int, blocks: list[list[int]]) -> tuple[Any, Any]:
    from flywheel.llm.llamacpp import gguf_perplexity, open_model

    llm = open_model(path, 512, threads)

    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        got: list[int] = []
        start = time.perf_counter()
        first = 0.0
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            first = first or time.perf_counter() - start
            got.append(int(token))
            if len(got) == n:
                break
        return first, time.perf_counter() - start, got

    return generate, lambda: gguf_perplexity(path, blocks, threads)


def _ortgenai(folder: Path, blocks: list[list[int]]) -> tuple[Any, Any]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        got: list[int] = []
        start = time.perf_counter()
        first = 0.0
        generator.append_tokens(ids)
        while not generator.is_done() and len(got) < n:
            generator.generate_next_token()
            first = first or time.perf_counter() - start
            got.append(int(generator.get_next_tokens()[0]))
        return first, time.perf_counter() - start, got

    def perplexity() -> float:
        nll, count = 0.0, 0
        for block in blocks:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(block) + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(block)
            logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0, : len(block) - 1]
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((logz - logits[np.arange(len(block) - 1), block[1:]]).sum())
            count += len(block) - 1
        return math.exp(nll / count)

    return generate, perplexity


def _run(runtime: str, work: Path, tokens: int, threads: int, quality: bool) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--measure", runtime, "--work", str(work),
                           "--tokens", str(tokens), "--threads", str(threads)]
                          + (["--quality"] if quality else []),
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{runtime} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_one(work: Path, tokens: int, threads: int, rounds: int) -> list[dict[str, Any]]:
    build_models(work)
    names = runtimes()
    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for k in range(rounds):  # round k starts k places further along the list
        for name in names[k % len(names):] + names[: k % len(names)]:
            seen[name].append(_run(name, work, tokens, threads, quality=k == 0))
            print(f"  round {k + 1}/{rounds} {name}: {seen[name][-1]['decode_tps']:.1f} tok/s", flush=True)
    base = seen["transformers"]
    reference = base[0]["tokens"]
    print(f"\nPart 1: {len(PROMPTS)} prompts x {tokens} greedy tokens, {threads} threads, one process each, "
          f"medians of {rounds} interleaved rounds")
    print(f"{'runtime':<24}{'TTFT ms':>8}{'decode tok/s':>13}{'e2e tok/s':>10}{'x decode':>9}{'range':>12}"
          f"{'RSS MB':>8}{'same tokens':>12}{'perplexity':>11}{'cost':>8}  buffers")
    rows = []
    for name in names:
        runs = seen[name]
        ratios = sorted(r["decode_tps"] / b["decode_tps"] for r, b in zip(runs, base, strict=True))
        same = sum(_prefix(a, b) for a, b in zip(runs[0]["tokens"], reference, strict=True))
        row = {"runtime": name, "decode_tps": statistics.median(r["decode_tps"] for r in runs),
               "ratio": statistics.median(ratios), "perplexity": runs[0]["perplexity"]}
        rows.append(row)
        ttft = statistics.median(r["ttft_s"] for r in runs) * 1000
        print(f"{name:<24}{ttft:>8.0f}{row['decode_tps']:>13.1f}"
              f"{statistics.median(r['e2e_tps'] for r in runs):>10.1f}{row['ratio']:>9.1f}"
              f"{f'{ratios[0]:.1f}-{ratios[-1]:.1f}':>12}{max(r['peak_rss_mb'] for r in runs):>8.0f}"
              f"{f'{same}/{tokens * len(PROMPTS)}':>12}{row['perplexity']:>11.4f}"
              f"{row['perplexity'] / base[0]['perplexity'] - 1:>+8.2%}  {runs[0].get('buffers', '')}")
    return rows


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- part 2: over HTTP ----------------------------------------------------------------------------


def part_two(work: Path, steps: int, requests: int, tokens: int) -> None:
    import httpx
    import yaml

    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["serving"]["port"] = 8765
    folder = work / "project"
    folder.mkdir()
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "FLYWHEEL_HOME": str(folder / ".flywheel"), "HF_HUB_OFFLINE": "1"}
    flywheel = [sys.executable, "-m", "flywheel.cli"]
    subprocess.run([*flywheel, "finetune", "--config", str(folder / "flywheel.yaml"), "--steps", str(steps)],
                   env=env, check=True, capture_output=True)
    print(f"\nPart 2: flywheel serve, {requests} requests per client, {tokens} greedy tokens each, serving "
          f"settings of the example (max_concurrent {cfg['serving']['max_concurrent']}, "
          f"threads {cfg['serving'].get('threads')})")
    print(f"{'runtime':<14}{'endpoint':<22}{'clients':>8}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'tok/s':>8}"
          f"{'TTFT ms':>9}")
    for runtime in ("transformers", "llama.cpp"):
        server = subprocess.Popen([*flywheel, "serve", "--config", str(folder / "flywheel.yaml")],
                                  env={**env, "FLYWHEEL_SERVING__RUNTIME": runtime},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{cfg['serving']['port']}"
        try:
            wait_ready(url, server, 300)
            name = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            endpoints = ["/v1/chat/completions"] + (["/v1/generate"] if runtime == "transformers" else [])
            for endpoint in endpoints:
                for clients in (1, 4):
                    row = _load(httpx, url, endpoint, name, clients, requests, tokens)
                    streams = endpoint != "/v1/generate" and clients == 1
                    ttft = f"{_ttft(httpx, url, name, tokens) * 1000:.0f}" if streams else ""
                    print(f"{runtime:<14}{endpoint:<22}{clients:>8}{row['rps']:>8.2f}{row['p50']:>8.2f}"
                          f"{row['p99']:>8.2f}{row['tps']:>8.1f}{ttft:>9}")
        finally:
            server.terminate()
            server.wait(30)


def _body(endpoint: str, name: str, tokens: int, i: int) -> dict[str, Any]:
    text = f"{PROMPTS[i % len(PROMPTS)]}"
    if endpoint == "/v1/generate":
        return {"prompt": text, "max_new_tokens": tokens, "temperature": 0}
    return {"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": 0}


def _load(httpx: Any, url: str, endpoint: str, name: str, clients: int, requests: int,
          tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests):
                start = time.perf_counter()
                r = http.post(f"{url}{endpoint}", json=_body(endpoint, name, tokens, k + i))
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    generated[0] += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "tps": generated[0] / wall}


def _ttft(httpx: Any, url: str, name: str, tokens: int) -> float:
    body = {**_body("/v1/chat/completions", name, tokens, 0), "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": ""' not in line and "[DONE]" not in line:
                return time.perf_counter() - start
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--http-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--work")
    ap.add_argument("--part", choices=("1", "2"), help="only part 1 (in-process) or part 2 (HTTP)")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.work), args.tokens, args.threads, args.quality)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.part != "2":
            part_one(Path(tmp), args.tokens, args.threads, args.rounds)
        if args.part != "1":
            part_two(Path(tmp), args.steps, args.requests, args.http_tokens)


if __name__ == "__main__":
    main()
