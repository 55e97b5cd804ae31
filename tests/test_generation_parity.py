"""Generation on tiny random GPT-J and GPT-NeoX models converted from transformers:
cached logits equal a full forward pass, and greedy / beam search outputs are
token-identical to transformers' `generate` (left-padded batches of different lengths)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from generation.batch import forward_slots, left_pad
from generation.config import GenerationConfig
from generation.generator import Generator
from tests.generation_helpers import converted_pair, hf_generate, random_prompts
from tests.hf_models import hf_logits
from tests.numerics import LOGITS_VS_TRANSFORMERS, float32_atol, forward_reductions

pytestmark = pytest.mark.numerics

KINDS = ("gptj_basic", "neox_basic")
LENGTHS = (7, 3, 11)      # one batch, three prompt lengths: left padding on both sides


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Each tiny model converted once for the module: {kind: ConvertedPair}."""
    return {kind: converted_pair(kind, str(tmp_path_factory.mktemp(kind))) for kind in KINDS}


def stop_token_seen_mid_way(tokens: list[list[int]], step: int) -> int:
    """A token the reference generates at `step` of row 0: used as the stop token, so rows
    finish at different steps (or run to the length limit)."""
    return tokens[0][step]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_full_forward_and_transformers(pairs, kind):
    """Prefill 6 slots, then 5 tokens one at a time through the cache: each token's logits
    equal a full forward pass over the left-padded batch (ours, to float32 rounding of the 3-block
    chain of sums of <= 128 terms at the logits' scale) and transformers' logits for the unpadded
    prompt (LOGITS_VS_TRANSFORMERS, the conversion tolerance; tests/numerics.py)."""
    pair = pairs[kind]
    prompts = random_prompts(pair.vocab_size, (11, 8, 5), seed=4)
    batch = left_pad(prompts, pad_id=0)
    ids = tf.constant(batch.tokens)                                                       # [3, 11]
    first = tf.constant(batch.first_slot)
    cache = pair.ours.empty_cache(3, 16)
    cached = []
    logits, cache = forward_slots(pair.ours, ids[:, :6], first, tf.constant(0), cache)
    cached.append(logits)
    for slot in range(6, 11):
        logits, cache = forward_slots(pair.ours, ids[:, slot:slot + 1], first, tf.constant(slot), cache)
        cached.append(logits)
    cached = tf.stack(cached, axis=1).numpy()                                             # [3, 6, V]
    valid = (np.arange(11)[None, :] >= batch.first_slot[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    full = pair.ours(ids, position_ids=tf.constant(positions), attention_mask=tf.constant(valid)).logits.numpy()
    real = valid[:, 5:].astype(bool)                     # padding slots hold no prediction to compare
    same_model = float32_atol(forward_reductions(3), 128, np.abs(full).max())       # ~8e-5 at |z| <= 2.2
    np.testing.assert_allclose(cached[real], full[:, 5:][real], atol=same_model, rtol=0)
    for row, prompt in enumerate(prompts):
        reference = hf_logits(pair.hf, np.array([prompt]))[0]                            # [n, V]
        for j, slot in enumerate(range(5, 11)):
            index = slot - batch.first_slot[row]                  # the slot's place in the unpadded prompt
            if index >= 0:
                np.testing.assert_allclose(cached[row, j], reference[index], atol=LOGITS_VS_TRANSFORMERS, rtol=0)


@pytest.mark.parametrize("kind,compile_mode", [("gptj_basic", "xla"), ("neox_basic", "eager")])
def test_greedy_matches_transformers(pairs, kind, compile_mode):
    pair = pairs[kind]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=1)
    free_run = hf_generate(pair.hf, prompts, max_new_tokens=10, do_sample=False)
    stop = stop_token_seen_mid_way(free_run, 4)
    expected = hf_generate(pair.hf, prompts, (stop,), max_new_tokens=10, do_sample=False)
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=(stop,))
    results = Generator(pair.ours, compile_mode, length_multiple=8).generate(prompts, config)
    assert [r.token_ids for r in results] == expected
    assert results[0].finish_reason == "stop" and results[0].token_ids[-1] == stop
    assert all(r.finish_reason == ("stop" if r.token_ids[-1] == stop else "length") for r in results)


@pytest.mark.parametrize("kind,length_penalty,early_stopping", [
    ("gptj_basic", 1.0, False), ("neox_basic", 1.0, False), ("gptj_basic", 2.0, True),
    ("neox_basic", -0.5, "never")])
def test_beam_search_matches_transformers(pairs, kind, length_penalty, early_stopping):
    pair = pairs[kind]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=2)
    settings = dict(max_new_tokens=9, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    free_run = hf_generate(pair.hf, prompts, do_sample=False, **settings)
    stop = stop_token_seen_mid_way(free_run, 3)
    expected = hf_generate(pair.hf, prompts, (stop,), do_sample=False, **settings)
    config = GenerationConfig(stop_token_ids=(stop,), **settings)
    results = Generator(pair.ours, "eager", length_multiple=8).generate(prompts, config)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == ("stop" if r.token_ids[-1] == stop else "length") for r in results)


def test_beam_search_compiled_matches_transformers(pairs):
    pair = pairs["neox_basic"]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=3)
    expected = hf_generate(pair.hf, prompts, (5,), max_new_tokens=8, num_beams=2, do_sample=False)
    config = GenerationConfig(max_new_tokens=8, num_beams=2, stop_token_ids=(5,))
    assert [r.token_ids for r in Generator(pair.ours, "xla", 8).generate(prompts, config)] == expected


def test_beam_search_returns_the_same_n_best_as_transformers(pairs):
    pair = pairs["gptj_basic"]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=4)
    settings = dict(max_new_tokens=7, num_beams=4, num_return_sequences=3, length_penalty=1.5)
    stop = stop_token_seen_mid_way(hf_generate(pair.hf, prompts, do_sample=False, **settings), 3)
    expected = hf_generate(pair.hf, prompts, (stop,), do_sample=False, **settings)   # [b * 3] grouped by prompt
    results = Generator(pair.ours, "eager", length_multiple=8).generate(
        prompts, GenerationConfig(stop_token_ids=(stop,), **settings))
    assert [r.token_ids for r in results] == expected
    for row in range(len(prompts)):
        scores = [r.score for r in results[row * 3:(row + 1) * 3]]
        assert scores == sorted(scores, reverse=True)


def test_beam_sampling_at_a_tiny_temperature_is_beam_search(pairs):
    """Drawing without replacement from softmax(scores / 1e-4) takes the candidates in score
    order, so beam sampling then makes transformers' beam-search choices, through the same
    filters-after-log-softmax path and scores (all scaled by 1 / temperature)."""
    pair = pairs["neox_basic"]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=6)
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    expected = hf_generate(pair.hf, prompts, (5,), do_sample=False, **settings)
    config = GenerationConfig(stop_token_ids=(5,), do_sample=True, temperature=1e-4, seed=3, **settings)
    results = Generator(pair.ours, "xla", length_multiple=8).generate(prompts, config)
    assert [r.token_ids for r in results] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_processors_inside_decoding_match_transformers(pairs, kind):
    """Repetition penalty, bad words (one- and two-token) and min_new_tokens, greedy and beam."""
    pair = pairs[kind]
    prompts = random_prompts(pair.vocab_size, LENGTHS, seed=5)
    free_run = hf_generate(pair.hf, prompts, max_new_tokens=8, do_sample=False)
    stop = free_run[1][1]                    # row 1 would stop after 2 tokens without min_new_tokens
    banned = next(t for t in free_run[0] if t != stop)
    bad_words = ((banned,), (free_run[2][0], free_run[2][1]))
    settings = dict(max_new_tokens=8, min_new_tokens=4, repetition_penalty=1.7)
    for beams in (1, 2):
        expected = hf_generate(pair.hf, prompts, (stop,), do_sample=False, num_beams=beams,
                               bad_words_ids=[list(w) for w in bad_words], **settings)
        config = GenerationConfig(stop_token_ids=(stop,), num_beams=beams, bad_words_ids=bad_words, **settings)
        results = Generator(pair.ours, "eager", length_multiple=8).generate(prompts, config)
        assert [r.token_ids for r in results] == expected
        for result in results:
            ids = result.token_ids
            assert len(ids) >= 4 and stop not in ids[:-1]
            assert bad_words[0][0] not in ids
            assert all(ids[i:i + 2] != list(bad_words[1]) for i in range(len(ids) - 1))
