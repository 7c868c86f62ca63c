"""Units under the engine: stop strings and incomplete characters held back, seeded sampling,
the left-padded cache keeping rows and cutting shared padding."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loralab.base_model import build_tiny_tokenizer
from loralab.serving.decoding import Sampler, SamplingParams, TextStream
from loralab.serving.kv import BatchKV, left_pad


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    tok = build_tiny_tokenizer()
    ids = tok("the contract END the party")["input_ids"]
    stream = TextStream(tok, stop=["END"])
    sent, stopped = "", False
    for token in ids:
        delta, stopped = stream.push(token)
        sent += delta
        assert "E" not in sent  # never a beginning of the stop string
        if stopped:
            break
    assert stopped and sent == "the contract " and stream.flush() == ""


def test_text_stream_waits_for_a_whole_character():
    tok = build_tiny_tokenizer()
    ids = tok("é")["input_ids"]
    assert len(ids) == 2  # two bytes, two tokens
    stream = TextStream(tok)
    assert stream.push(ids[0]) == ("", False)
    assert stream.push(ids[1]) == ("é", False)


def test_seeded_sampler_is_reproducible_and_top_p_keeps_the_head():
    logits = torch.tensor([2.0, 1.9, -5.0, -5.0])
    draws = [Sampler(SamplingParams(8, temperature=1.0, seed=5)).sample(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    narrow = Sampler(SamplingParams(8, temperature=1.0, top_p=0.01, seed=1))
    assert {narrow.sample(logits) for _ in range(20)} == {0}
    assert Sampler(SamplingParams(8, temperature=0.0)).sample(logits) == 0


def _cache(rows: int, length: int, value: float) -> DynamicCache:
    cache = DynamicCache()
    cache.update(
        torch.full((rows, 1, length, 2), value), torch.full((rows, 1, length, 2), value), 0
    )
    return cache


def test_batch_kv_appends_left_padded_and_drops_shared_padding():
    short = BatchKV(_cache(1, 2, 1.0), torch.ones(1, 2, dtype=torch.long))
    ids, mask = left_pad([[5, 6, 7, 8], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 0, 9]] and mask.tolist() == [
        [1, 1, 1, 1],
        [0, 0, 0, 1],
    ]
    short.append(BatchKV(_cache(2, 4, 2.0), mask))
    assert short.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert short.layers[0].keys[0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    short.keep([2, 0])  # the long row leaves: two columns are padding in every row left
    assert short.mask.tolist() == [[0, 1], [1, 1]] and short.layers[0].keys.shape == (2, 1, 2, 2)
    assert short.lengths().tolist() == [1, 2]
