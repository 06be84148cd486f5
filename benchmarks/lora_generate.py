"""Generation speed of a LoRA adapter merged into its base vs applied on the fly (PEFT), one run.

Why the server merges at load time. Same SmolLM2-135M-Instruct base, the same r=8 adapter on
q_proj/v_proj (random non-zero B, so the adapter really contributes), greedy decoding of the same
prompt, interleaved repetitions; prints tokens/s of each and the ratio.

    .venv/bin/python benchmarks/lora_generate.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from flywheel.config import cache_dir
from flywheel.llm.base import builtin_folder, load_model, load_tokenizer

PROMPT = "Article 21: Protection of life and personal liberty\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    folder = builtin_folder(cache_dir())
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    on_the_fly = get_peft_model(load_model(folder), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM")).eval()
    merged = copy.deepcopy(on_the_fly).merge_and_unload().eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = float((merged(ids).logits - on_the_fly(ids).logits).abs().max())

    def run(model: torch.nn.Module) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - start, out[0].tolist()

    run(merged), run(on_the_fly)  # warm-up
    times: dict[str, list[float]] = {"merged": [], "on the fly": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, model in (("merged", merged), ("on the fly", on_the_fly)):
            seconds, tokens = run(model)
            times[name].append(seconds)
            outputs[name] = tokens
    print(f"torch threads {torch.get_num_threads()}, {args.tokens} new tokens, {args.repeats} repeats, "
          f"max |logit diff| merged vs on the fly {diff:.2e}, same greedy tokens: "
          f"{outputs['merged'] == outputs['on the fly']}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:>11}: median {med:.3f} s  ->  {args.tokens / med:6.1f} tokens/s")
    ratio = statistics.median(times["on the fly"]) / statistics.median(times["merged"])
    print(f"merged is {ratio:.2f}x the speed of applying the adapter on the fly")


if __name__ == "__main__":
    main()
