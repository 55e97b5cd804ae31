"""Per-row cache writes and the slot decoder: rows at different slots decode what they would alone."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from generation.batch import left_pad
from generation.config import GenerationConfig
from generation.generator import Generator
from layers.attention import write_cache
from model import GPTJModel
from serving.slot_decoder import SlotDecoder
from serving.slots import row_settings
from tests.serving_helpers import slot_test_config

CONFIG = slot_test_config()
# float32 logits of a 2-layer d=32 model: the cached and full forward sum the same products in a
# possibly different order; each logit is a sum of ~32-64 terms of size ~1, so rounding differs by
# at most ~64 * 2**-24 ~ 4e-6 per layer; 1e-4 leaves a wide margin and still catches a wrong slot.
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return GPTJModel(CONFIG, seed=3)


def test_write_cache_per_row_index_matches_one_slice_per_row():
    rng = np.random.default_rng(0)
    cache = tf.constant(rng.normal(size=[3, 2, 8, 4]), tf.float32)
    new = tf.constant(rng.normal(size=[3, 2, 2, 4]), tf.float32)       # [b, s, h, d]
    index = tf.constant([0, 5, 3])
    got = write_cache(cache, new, index).numpy()
    for row, start in enumerate([0, 5, 3]):
        alone = write_cache(cache[row:row + 1], new[row:row + 1], tf.constant(start)).numpy()
        np.testing.assert_array_equal(got[row], alone[0])              # a copy: exact


def test_rows_at_different_slots_match_the_full_forward(model):
    """Three sequences of different lengths, decoded one token per row per call with per-row cache
    indices, give the logits of the uncached forward over each whole sequence."""
    rng = np.random.default_rng(1)
    lengths = [5, 9, 3]
    sequences = [rng.integers(0, 97, size=n).tolist() for n in lengths]
    cache_length = 16
    cache = model.empty_cache(3, cache_length)
    # row r starts writing at slot offset[r] (its tokens sit at different slots in every row)
    offsets = np.array([0, 2, 6], np.int32)
    for t in range(max(lengths)):
        ids = tf.constant([[seq[min(t, len(seq) - 1)]] for seq in sequences], tf.int32)
        slots = offsets + np.minimum(t, np.array(lengths) - 1)
        valid = (np.arange(cache_length)[None, :] >= offsets[:, None]) & (np.arange(cache_length)[None, :] <= slots[:, None])
        out = model(ids, position_ids=tf.constant((slots - offsets)[:, None]), attention_mask=tf.constant(valid, tf.int32),
                    cache=cache, cache_index=tf.constant(slots))
        cache = out.cache
        for row, seq in enumerate(sequences):
            if t < len(seq):
                full = model(tf.constant([seq[:t + 1]])).logits[0, -1].numpy()
                np.testing.assert_allclose(out.logits[row, -1].numpy(), full, atol=ATOL)


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_slot_decoder_greedy_and_sampling_match_the_generator(model, steps_per_call):
    """Rows admitted at different steps, mixing greedy and sampling settings, produce the
    Generator's tokens for each request alone, one step per call or several (a call ends
    early at a row's stop id or token budget, as the scheduler relies on)."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 97, size=n).tolist() for n in (4, 11, 7)]
    configs = [GenerationConfig(max_new_tokens=6),
               GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                                repetition_penalty=1.3, seed=11),
               GenerationConfig(max_new_tokens=6, do_sample=True, seed=5, min_new_tokens=3, stop_token_ids=(4,))]
    generator = Generator(model, compile_mode="eager")
    expected = [generator.generate([p], c, seeds=[c.seed])[0].token_ids for p, c in zip(prompts, configs)]

    decoder = SlotDecoder(model, slots=4, cache_length=64, compile_mode="graph", steps_per_call=steps_per_call)
    rows: dict[int, int] = {}                    # slot row -> request
    got: dict[int, list[int]] = {}
    done: set[int] = set()
    idle = GenerationConfig()
    table = [idle] * 4

    def decode():
        settings = row_settings(table, [c.seed for c in table], [0] * 4)
        budget = np.full([4], steps_per_call + 1, np.int32)
        for r, req in rows.items():
            if req not in done:
                budget[r] = configs[req].max_new_tokens - len(got[req])
        chosen, ended = decoder.decode(settings, budget)
        assert not ended.any()                   # no beam group here
        assert 1 <= len(chosen) <= steps_per_call
        for tokens in chosen:
            for r, req in rows.items():
                if req not in done:
                    got[req].append(int(tokens[r]))
                    if len(got[req]) == configs[req].max_new_tokens or got[req][-1] in configs[req].stop_token_ids:
                        done.add(req)

    for request, (prompt, config) in enumerate(zip(prompts, configs)):
        row = [1, 3, 0][request]                  # arbitrary rows, joining one call apart
        batch = left_pad([prompt], 0, 32)
        first, _ = decoder.admit(row, batch.tokens, batch.first_slot, row_settings([config], [config.seed], [0]))
        rows[row], got[request], table[row] = request, [int(first[0])], config
        decode()
    while len(done) < 3:
        decode()
    for request in range(3):
        assert got[request] == expected[request], request


def test_warm_up_compiles_every_prompt_bucket_before_serving(model):
    """After Scheduler.warm_up, requests of any allowed prompt length trace nothing more (a trace
    in a request's path is an XLA compilation that stalls every slot), and still decode as the
    Generator does."""
    import threading

    from serving.scheduler import Job, Scheduler
    scheduler = Scheduler(model, slots=2, cache_length=96, compile_mode="graph", steps_per_call=4)
    scheduler.warm_up(max_prompt_tokens=64)
    traces = scheduler.decoder.traces
    assert traces == 3                               # prompt buckets 32 and 64, and the decode call
    scheduler.start()
    generator = Generator(model, compile_mode="eager")
    config = GenerationConfig(max_new_tokens=5)
    prompts = [list(range(1, 30)), list(range(5, 60))]          # one prompt per bucket
    done, results = threading.Event(), {}

    def sink(index):
        def receive(kind, sequence, payload):
            if kind == "finish":
                results[index] = payload.token_ids
                if len(results) == len(prompts):
                    done.set()
        return receive
    for index, prompt in enumerate(prompts):
        scheduler.submit(Job(prompt, config, 0, sink(index)))
    assert done.wait(120)
    scheduler.stop(60)
    assert scheduler.decoder.traces == traces
    for index, prompt in enumerate(prompts):
        assert results[index] == generator.generate([prompt], config)[0].token_ids
