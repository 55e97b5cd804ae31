"""Logit processors, token choice, the left-padded layout and stop-string helpers, each
against transformers' implementation of the same rule or a NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers.generation import logits_process as hf

from generation import processors
from generation.batch import key_valid, left_pad, slot_positions
from generation.beam_search import candidate_count, length_penalty_divisors
from generation.config import GenerationConfig, GenerationConfigError
from generation.sampling import greedy_tokens, sample_tokens, sample_without_replacement
from generation.text import find_stop_string, held_back
from tests.numerics import binomial_atol

pytestmark = pytest.mark.numerics

VOCAB = 50


def random_scores(batch: int = 4, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal([batch, VOCAB]) * 2).astype(np.float32)


def assert_same_scores(ours: tf.Tensor, reference: torch.Tensor) -> None:
    ours, reference = ours.numpy(), reference.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(reference))
    finite = np.isfinite(reference)
    # each processor is one or two elementwise float32 operations per score (|score| <= 10):
    # <= 2 roundings apart, 2u |s| = 1.2e-6; 8u relative plus 1e-6 absolute covers it
    np.testing.assert_allclose(ours[finite], reference[finite], rtol=1e-6, atol=1e-6)


def test_repetition_penalty_matches_transformers_including_left_padding():
    scores = random_scores()
    history = np.random.default_rng(1).integers(0, VOCAB, size=[4, 12])
    pads = np.array([0, 3, 11, 5])                                   # leading padding of each row
    valid = np.arange(12)[None, :] >= pads[:, None]
    reference = hf.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=torch.tensor(pads))(
        torch.tensor(history), torch.tensor(scores))
    ours = processors.repetition_penalty(tf.constant(scores), tf.constant(history, tf.int32), tf.constant(valid), 1.3)
    assert_same_scores(ours, reference)
    untouched = ~processors.token_presence(tf.constant(history, tf.int32), tf.constant(valid), VOCAB).numpy()
    np.testing.assert_array_equal(ours.numpy()[untouched], scores[untouched])


def test_bad_words_match_transformers():
    history = np.array([[5, 6, 7, 8], [1, 2, 6, 7], [9, 9, 9, 3]])
    bad_words = [[4], [7, 11], [6, 7, 12], [9, 3, 13], [8, 8, 14]]
    scores = random_scores(3)
    reference = hf.NoBadWordsLogitsProcessor(bad_words, eos_token_id=49)(torch.tensor(history), torch.tensor(scores))
    banned = processors.banned_tokens(tf.constant(history, tf.int32), tf.ones([3, 4], tf.bool), tf.constant(4),
                                      tuple(map(tuple, bad_words)), VOCAB)
    assert_same_scores(processors.suppress(tf.constant(scores), banned), reference)
    assert sorted(np.nonzero(banned.numpy()[1])[0]) == [4, 11, 12]      # row 1 ends with 6, 7


def test_bad_word_prefix_never_matches_padding_or_unwritten_slots():
    history = tf.constant([[7, 7, 3, 0, 0]], tf.int32)
    valid = tf.constant([[False, True, True, False, False]])          # slot 0 is padding; 3+ not written yet
    words = ((7, 7, 20), (7, 3, 21), (3, 0, 22))
    banned = processors.banned_tokens(history, valid, tf.constant(3), words, VOCAB).numpy()[0]
    assert sorted(np.nonzero(banned)[0]) == [21]


def test_per_row_tables_ban_what_each_rows_own_words_ban_alone():
    """A serving batch's rows carry their own words in fixed-size tables (padded with empty words
    and -1 prefix entries) and stand at their own next slots: each row's mask equals banned_tokens
    for that row's words alone (booleans: exact)."""
    rng = np.random.default_rng(4)
    history = rng.integers(0, 6, size=[3, 9]).astype(np.int32)      # small ids: prefixes do match
    valid = np.arange(9)[None, :] >= np.array([0, 2, 4])[:, None]
    next_slot = np.array([9, 6, 8], np.int32)
    valid &= np.arange(9)[None, :] < next_slot[:, None]
    words = [((4,), (1, 2, 30), (history[0, 7], history[0, 8], 31)),
             (),
             ((history[2, 6], history[2, 7], 32), (5, 33), (2, 2, 2, 2, 34))]
    tables = [processors.bad_words_table(w, words=4, prefix_length=5) for w in words]
    prefixes = tf.constant(np.stack([t[0] for t in tables]))                            # [3, 4, 5]
    last = tf.constant(np.stack([t[1] for t in tables]))                                # [3, 4]
    got = processors.banned_by_table(tf.constant(history), tf.constant(valid), tf.constant(next_slot), prefixes,
                                     last, VOCAB).numpy()
    for row, row_words in enumerate(words):
        alone = (processors.banned_tokens(tf.constant(history[row:row + 1]), tf.constant(valid[row:row + 1]),
                                          tf.constant(next_slot[row]), row_words, VOCAB).numpy()[0]
                 if row_words else np.zeros(VOCAB, bool))
        np.testing.assert_array_equal(got[row], alone)
    assert got[0, 31] and got[2, 32] and not got[1].any()
    with pytest.raises(ValueError, match="do not fit a table of 4 words of up to 3 tokens"):
        processors.bad_words_table(((1, 2, 3, 4),), words=4, prefix_length=2)


def test_a_one_token_bad_word_that_is_a_stop_token_is_ignored_as_in_transformers():
    config = GenerationConfig(stop_token_ids=(3,), bad_words_ids=((3,), (4,), (3, 5)))
    assert config.effective_bad_words == ((4,), (3, 5))


@pytest.mark.parametrize("new_tokens", [0, 2, 3, 5])
def test_min_new_tokens_matches_transformers(new_tokens):
    scores = random_scores()
    prompt = 6
    ids = torch.zeros([4, prompt + new_tokens], dtype=torch.long)
    reference = hf.MinNewTokensLengthLogitsProcessor(prompt, 3, eos_token_id=[2, 9])(ids, torch.tensor(scores))
    ours = processors.suppress_before(tf.constant(scores), (2, 9), tf.constant(new_tokens), 3)
    assert_same_scores(ours, reference)


@pytest.mark.parametrize("value", [0.3, 1.0, 2.5])
def test_temperature_matches_transformers(value):
    scores = random_scores()
    assert_same_scores(processors.temperature(tf.constant(scores), value),
                       hf.TemperatureLogitsWarper(value)(None, torch.tensor(scores)))


@pytest.mark.parametrize("k", [1, 5, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(k):
    scores = random_scores()
    assert_same_scores(processors.top_k_filter(tf.constant(scores), k),
                       hf.TopKLogitsWarper(k)(None, torch.tensor(scores)))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.75, 0.95, 0.999])
def test_top_p_matches_transformers(p):
    scores = random_scores(8, seed=3)
    assert_same_scores(processors.top_p_filter(tf.constant(scores), p),
                       hf.TopPLogitsWarper(p)(None, torch.tensor(scores)))


@pytest.mark.parametrize("k,p", [(1, 1.0), (2, 1.0), (1, 0.01), (1, 0.6)])
def test_filters_keep_min_tokens_as_transformers_beam_sampling_does(k, p):
    scores = torch.tensor(random_scores(8, seed=4))
    ours = processors.top_p_filter(processors.top_k_filter(tf.constant(scores.numpy()), k, 3), p, 3)
    reference = hf.TopPLogitsWarper(p, min_tokens_to_keep=3)(None, hf.TopKLogitsWarper(k, min_tokens_to_keep=3)(
        None, scores)) if p < 1.0 else hf.TopKLogitsWarper(k, min_tokens_to_keep=3)(None, scores)
    assert_same_scores(ours, reference)
    assert (np.isfinite(ours.numpy()).sum(axis=1) >= 3).all()


def test_top_p_numpy_reference_on_a_known_distribution():
    probs = np.array([[0.5, 0.05, 0.3, 0.15]], np.float32)
    kept = np.isfinite(processors.top_p_filter(tf.constant(np.log(probs)), 0.79).numpy())
    np.testing.assert_array_equal(kept, [[True, False, True, False]])   # 0.5 + 0.3 >= 0.79
    kept = np.isfinite(processors.top_p_filter(tf.constant(np.log(probs)), 0.81).numpy())
    np.testing.assert_array_equal(kept, [[True, False, True, True]])


def test_process_scores_applies_sampling_filters_only_when_sampling():
    scores = tf.constant(random_scores())
    history, valid = tf.zeros([4, 3], tf.int32), tf.zeros([4, 3], tf.bool)
    greedy = GenerationConfig(temperature=0.5, top_k=2, top_p=0.5)
    np.testing.assert_array_equal(
        processors.process_scores(scores, greedy, history, valid, tf.constant(3), tf.constant(0)).numpy(), scores)
    sampling = greedy.replace(do_sample=True)
    out = processors.process_scores(scores, sampling, history, valid, tf.constant(3), tf.constant(0)).numpy()
    assert (np.isfinite(out).sum(axis=1) <= 2).all()


def test_draws_without_replacement_follow_sequential_sampling():
    """Two draws from [0.5, 0.25, 0.15, 0.1]: distinct, the first ~ p, the second ~ p renormalised
    without the first (e.g. P(second = 1 | first = 0) = 0.25 / 0.5). Frequencies within 4.5
    standard errors (tests/numerics.py: a correct sampler fails one of these 7 categories with
    probability < 5e-5). Seeds are fixed, so the test is deterministic; another CPU's rounding of
    the Gumbel noise flips a draw only when it lands within ~1e-7 of a tie (~1e-3 draws in 2560),
    each moving a frequency by 1/2560."""
    probs = np.array([0.5, 0.25, 0.15, 0.1], np.float32)
    rows = 64
    scores = tf.constant(np.tile(np.log(probs), [rows, 1]))
    seeds = tf.range(rows, dtype=tf.int64)
    draw = tf.function(sample_without_replacement, reduce_retracing=True)
    pairs = np.concatenate([draw(scores, seeds, tf.constant(step), 2).numpy() for step in range(40)])  # [2560, 2]
    assert (pairs[:, 0] != pairs[:, 1]).all()
    first = np.bincount(pairs[:, 0], minlength=4) / len(pairs)
    assert (np.abs(first - probs) <= binomial_atol(probs, len(pairs))).all(), first
    after_zero = pairs[pairs[:, 0] == 0, 1]
    second = np.bincount(after_zero, minlength=4)[1:] / len(after_zero)
    assert (np.abs(second - probs[1:] / 0.5) <= binomial_atol(probs[1:] / 0.5, len(after_zero))).all(), second


def test_greedy_choice_is_argmax():
    scores = random_scores()
    np.testing.assert_array_equal(greedy_tokens(tf.constant(scores)).numpy(), scores.argmax(axis=1))


def test_samples_follow_softmax_and_depend_only_on_seed_and_step():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))
    rows = 64
    scores = tf.constant(np.tile(logits, [rows, 1]))
    seeds = tf.range(rows, dtype=tf.int64)
    draw = tf.function(sample_tokens)                                            # one trace, 40 calls
    draws = np.concatenate([draw(scores, seeds, tf.constant(step)).numpy() for step in range(40)])
    frequencies = np.bincount(draws, minlength=4) / draws.size                   # 2560 draws
    # within 4.5 standard errors per category: false failure < 3e-5 for the 4 (tests/numerics.py)
    assert (np.abs(frequencies - np.exp(logits)) <= binomial_atol(np.exp(logits), draws.size)).all(), frequencies
    again = sample_tokens(scores, seeds, tf.constant(7)).numpy()
    np.testing.assert_array_equal(again, sample_tokens(scores, seeds, tf.constant(7)).numpy())
    # a row's draw does not depend on the other rows
    single = sample_tokens(scores[5:6], seeds[5:6], tf.constant(7)).numpy()
    assert single[0] == again[5]
    excluded = tf.constant([[0.0, float("-inf"), 0.0, float("-inf")]] * rows)
    assert set(sample_tokens(excluded, seeds, tf.constant(0)).numpy()) <= {0, 2}


def test_left_padding_positions_match_transformers_mask_cumsum():
    """transformers' generate: position = cumsum(attention_mask) - 1 (padding clamped to 0),
    then last position + 1 per new token."""
    batch = left_pad([[5, 6, 7], [8], [1, 2, 3, 4, 5]], pad_id=0, multiple=8)
    assert batch.prompt_slots == 8 and batch.first_slot.tolist() == [5, 7, 3]
    assert batch.tokens[0].tolist() == [0, 0, 0, 0, 0, 5, 6, 7]
    mask = (np.arange(8)[None, :] >= batch.first_slot[:, None]).astype(np.int64)
    reference = torch.tensor(mask).cumsum(-1) - 1
    reference = reference.masked_fill(torch.tensor(mask) == 0, 0).numpy()
    np.testing.assert_array_equal(slot_positions(tf.constant(batch.first_slot), tf.constant(0), 8).numpy(), reference)
    next_positions = slot_positions(tf.constant(batch.first_slot), tf.constant(8), 1).numpy()[:, 0]
    np.testing.assert_array_equal(next_positions, reference[:, -1] + 1)
    np.testing.assert_array_equal(key_valid(tf.constant(batch.first_slot), tf.constant(8), 10).numpy(),
                                  np.pad(mask, [(0, 0), (0, 2)]).astype(bool))


def test_beam_search_constants():
    assert candidate_count(GenerationConfig(num_beams=3)) == 6
    assert candidate_count(GenerationConfig(num_beams=3, stop_token_ids=(1, 2, 3))) == 12
    divisors = length_penalty_divisors(4, 0.5)
    np.testing.assert_array_equal(divisors, np.float32([1.0, 1.0, 2 ** 0.5, 3 ** 0.5, 2.0]))


def test_stop_string_helpers():
    assert find_stop_string("abc\n\nde", ["de", "\n\n"]) == (3, "\n\n")
    assert find_stop_string("abcde", ["cd", "c"]) == (2, "cd")
    assert find_stop_string("abc", ["x"]) is None
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world", "lo!"]) == 2
    assert held_back("ab\ufffd", []) == 1
    assert held_back("abc", ["x"]) == 0


@pytest.mark.parametrize("settings,message", [
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(num_beams=0), "num_beams=0 must be an integer >= 1"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0 must be > 0 when sampling"),
    (dict(do_sample=True, temperature=-1.0), "temperature=-1.0 must be > 0 when sampling"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens=5 must be between 0 and max_new_tokens=4"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
    (dict(num_beams=2, stop_strings=("x",)), "stop strings work with greedy decoding and sampling"),
    (dict(bad_words_ids=((),)), "bad_words_ids entry [] must be a non-empty list"),
    (dict(early_stopping="sometimes"), "early_stopping='sometimes' must be true, false or 'never'"),
    (dict(num_return_sequences=0), "num_return_sequences=0 must be an integer >= 1"),
    (dict(num_return_sequences=2), "num_return_sequences=2 with greedy decoding would repeat one answer"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
])
def test_bad_settings_are_value_errors_that_say_what_to_do(settings, message):
    with pytest.raises(GenerationConfigError) as info:
        GenerationConfig(**settings)
    assert message in str(info.value) and isinstance(info.value, ValueError)


def test_model_and_prompt_checks():
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=(100,))
    with pytest.raises(GenerationConfigError, match=r"stop token id 100 is outside the model vocabulary "
                                                    r"\(model.vocab_size=100\)"):
        config.check_against_model(100)
    config = GenerationConfig(max_new_tokens=10)
    with pytest.raises(GenerationConfigError, match="prompt 1 is empty"):
        config.check_prompts([[1], []], 64, 100)
    with pytest.raises(GenerationConfigError, match="prompt 0 has 55 tokens but model.max_position_embeddings=64 "
                                                    "leaves room for at most 54 with max_new_tokens=10"):
        config.check_prompts([[1] * 55], 64, 100)
    config.check_prompts([[1] * 54], 64, 100)
    with pytest.raises(GenerationConfigError, match=r"^max_new_tokens=100000 leaves no position for the prompt: "
                                                    r"model.max_position_embeddings=64 .* at most 63 new tokens"):
        GenerationConfig(max_new_tokens=100000).check_prompts([[1]], 64, 100)
    with pytest.raises(GenerationConfigError, match="prompt 0 holds token id 100 outside"):
        config.check_prompts([[100]], 64, 100)
