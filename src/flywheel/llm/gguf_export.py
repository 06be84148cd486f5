"""A merged Llama-architecture model folder written as one GGUF file, for llama.cpp.

Written with the `gguf` package's own writer, tensor-name map and quantiser (llama.cpp's
Python library), the way llama.cpp's converter writes a Llama model: the hyperparameters as GGUF
keys, each tensor under its GGUF name, the query and key projections permuted from the Hugging
Face rotary layout to llama.cpp's, the BPE vocabulary and merges, the special tokens and the
chat template. Norm weights stay float32; the matrices are written at the chosen precision:
`f32` (exact), `f16` (the default: half the size, the tokens of greedy decoding unchanged on
SmolLM2 in the tests), `q8_0` (8-bit blocks, a quarter of f32), `q4_0` (4-bit blocks, an
eighth; the embedding, which is also the output layer of a tied model, stays 8-bit, as
llama.cpp's own quantiser keeps the output layer at higher precision), `q4_k_m` (llama.cpp's
4-bit "K-quant" mix: written at f16, then quantised by llama.cpp's own quantiser, which keeps
some tensors at 6 bits and falls back to other types where a row's width is not a multiple of
256, as SmolLM2's 576 is not; on SmolLM2 it costs about a fifth of q4_0's perplexity) or
`iq4_nl` (llama.cpp's non-linear 4-bit blocks of 32, its 16 levels spaced like the weights
rather than evenly, the output layer at 8 bits; quantised by llama.cpp from f16 too: on SmolLM2
about a third of q4_0's perplexity cost, and decoded faster than q4_0).

Serving feeds llama.cpp token ids made by the model's own Hugging Face tokenizer and decodes its
output with it, so the vocabulary written here must only let llama.cpp load the file; the text
in and out is the tokenizer's, exactly as on the transformers runtime.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flywheel.core.errors import FlywheelError
from flywheel.core.extras import require
from flywheel.registry import file_sha256

Precision = Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl"]
PRECISIONS: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl")
# made by llama.cpp's quantiser from f16
LLAMA_QUANTISED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL"}


class GgufError(FlywheelError):
    """The model cannot be written as GGUF; the message says why."""


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Hugging Face's rotary layout of a query/key projection to llama.cpp's (as its converter)."""
    heads = n_head_kv if n_head_kv is not None and n_head != n_head_kv else n_head
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE)."""
    spec = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return "gpt-2"


def write_gguf(folder: Path, out: Path, precision: Precision = "f16", name: str = "model") -> str:
    """Write the model in `folder` (config.json, model.safetensors, tokenizer) to `out`; returns
    the file's sha256."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise GgufError(f"GGUF export writes Llama-architecture models (SmolLM2, Llama); this one is "
                        f"'{config.get('model_type')}': use the transformers runtime")
    if precision not in PRECISIONS:
        raise GgufError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision in LLAMA_QUANTISED:
        half = out.with_name(out.name + ".f16.partial")
        try:
            write_gguf(folder, half, "f16", name)
            _llama_quantise(half, out, LLAMA_QUANTISED[precision])
        finally:
            half.unlink(missing_ok=True)
        return file_sha256(out)
    writer = gguf.GGUFWriter(str(out), "llama")
    _hyperparameters(writer, config, name, precision)
    _vocabulary(writer, folder, int(config["vocab_size"]))
    _tensors(writer, folder, config, precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file_sha256(out)


def _llama_quantise(source: Path, out: Path, ftype: str) -> None:
    """llama.cpp's own quantiser (the `llamacpp` extra), f16 GGUF in, `ftype` out."""
    import ctypes

    require("llamacpp", f"the {ftype} GGUF export")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 0  # every core
    # llama.cpp writes a line per tensor (and one per fallback) to stderr: kept, shown on failure
    with tempfile.TemporaryFile() as said:
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                                    ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        log_tail = said.read()[-2000:].decode("utf-8", "replace")
    if failed:
        out.unlink(missing_ok=True)
        raise GgufError(f"llama.cpp could not quantise {source.name} to {ftype}:\n{log_tail}")


def _hyperparameters(writer: Any, config: dict[str, Any], name: str, precision: Precision) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or
                                    (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[precision])


def _vocabulary(writer: Any, folder: Path, vocab_size: int) -> None:
    """The BPE vocabulary as llama.cpp's converter writes a GPT-2-style one."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)


def _tensors(writer: Any, folder: Path, config: dict[str, Any], precision: Precision) -> None:
    import gguf
    from safetensors.numpy import load_file

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    weights: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    for hf_name, data in weights.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the embedding as the output when there is none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GgufError(f"no GGUF name for the tensor '{hf_name}'")
        data = data.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, heads, kv_heads)
        if data.ndim == 1 or precision == "f32":
            writer.add_tensor(gguf_name, data)
        elif precision == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            kind = (gguf.GGMLQuantizationType.Q4_0 if precision == "q4_0" and gguf_name != "token_embd.weight"
                    else gguf.GGMLQuantizationType.Q8_0)
            packed = gguf.quants.quantize(data, kind)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=kind)

