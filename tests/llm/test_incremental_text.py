"""The llama.cpp runtime's text: decoded a few tokens at a time, equal to decoding every id."""

import numpy as np
import pytest

from flywheel.llm.runtime import IncrementalText, first_stop
from tests.tiny_llm import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("seed", range(5))
def test_pieces_add_up_to_the_decoding_of_every_id(tokenizer, seed):
    ids = np.random.default_rng(seed).integers(3, tokenizer.vocab_size, 300).tolist()
    text = IncrementalText(tokenizer)
    pieces = [text.add(i) for i in ids]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.final() == whole
    assert whole.startswith("".join(pieces)) and "".join(pieces) == text.text


def test_a_stop_string_is_found_where_the_whole_text_would_find_it(tokenizer):
    ids = tokenizer("Article 21: Protection of life and personal liberty. No person shall be "
                    "deprived of his life")["input_ids"]
    for stop in (["life"], ["personal lib", "zzz"], ["No person shall"], ["never there"]):
        text = IncrementalText(tokenizer, stop)
        for i, token in enumerate(ids):
            text.add(token)
            expected = first_stop(tokenizer.decode(ids[:i + 1], skip_special_tokens=True), stop)
            assert (text.stop_at is None) == (expected is None), (stop, i)
        assert text.stop_at == first_stop(text.final(), stop)
