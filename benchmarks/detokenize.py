"""What the llama.cpp runtime spends per generated token on text: decoding and stop-string search.

Before: every new token decoded every id so far and searched the whole text for the stop strings
(O(n^2) per answer). After: `IncrementalText` decodes a few tokens at a time and searches only
where a stop string could start. Both run here on the same token sequences (random ids standing
for an answer whose EOS never comes), with two stop strings that never match, at 256 and 1,024
tokens; prints microseconds per token and the ratio. No model runs: this is the overhead llama.cpp's
own decoding pays on top.

    .venv/bin/python benchmarks/detokenize.py [--tokenizer FOLDER] [--repeats 5]

Without --tokenizer, a byte-level BPE tokenizer is trained on the Constitution sample (the tests'
recipe, asked for 8,000 ids: the sample gives 2,384); --tokenizer takes any Hugging Face tokenizer
folder (a LoRA project's base model, for example).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.llm.runtime import IncrementalText, first_stop

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "constitution_sample.jsonl"
STOP = ("<|im_end|>", "\n\nUser:")


def trained_tokenizer(vocab: int = 8000) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    texts = [f"Article {r['article']}: {r['title']}\n{r['description']}" for r in rows]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def before(tokenizer: Any, ids: list[int]) -> str:
    """The loop as it was: decode everything, search everything, at every token."""
    new: list[int] = []
    full = ""
    for token in ids:
        new.append(token)
        full = tokenizer.decode(new, skip_special_tokens=True)
        if first_stop(full, STOP) is not None:
            break
    return full


def after(tokenizer: Any, ids: list[int]) -> str:
    text = IncrementalText(tokenizer, STOP)
    for token in ids:
        text.add(token)
        if text.stop_at is not None:
            break
    return text.final()


def per_token_us(run: Any, tokenizer: Any, ids: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(tokenizer, ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / len(ids) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer folder")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = trained_tokenizer()
    rng = np.random.default_rng(0)
    special = set(tokenizer.all_special_ids)
    print(f"tokenizer: {args.tokenizer or 'byte-level BPE trained on the sample'}, "
          f"{len(tokenizer):,} ids; median of {args.repeats}")
    print(f"{'tokens':>7} {'before us/token':>16} {'after us/token':>15} {'ratio':>7}")
    for n in (256, 1024):
        ids = [int(i) for i in rng.integers(0, len(tokenizer), n * 2) if int(i) not in special][:n]
        assert before(tokenizer, ids) == after(tokenizer, ids), "the texts differ"
        old = per_token_us(before, tokenizer, ids, args.repeats)
        new = per_token_us(after, tokenizer, ids, args.repeats)
        print(f"{n:>7} {old:>16.1f} {new:>15.1f} {old / new:>6.1f}x")


if __name__ == "__main__":
    main()
