"""Beam groups in the slot batch: every request's answer is generation.Generator's for it alone,
token for token, while greedy, sampled and beam rows share each decode step; admission is FIFO."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from generation.config import GenerationConfig
from generation.generator import Generator
from model import GPTJModel
from serving.scheduler import Job, Scheduler
from serving.slots import REORDER_CHUNK, follow_sources
from tests.serving_helpers import slot_test_config

CONFIG = slot_test_config()
# Beam scores are sums of at most 8 log-probabilities. The slot step and the Generator compute a
# logit through different batch shapes, which may sum its products in another order: at most
# ~64 * 2**-24 ~ 4e-6 apart per layer (tests/test_serving_slots.py), 8e-6 over two layers, and
# log-softmax moves by at most as much again (logsumexp is 1-Lipschitz in the max norm): 1.6e-5 a
# step, 1.3e-4 over 8 steps before the length penalty's division by >= 1. 1e-3 leaves a margin.
SCORE_ATOL = 1e-3


@pytest.fixture(scope="module")
def model():
    return GPTJModel(CONFIG, seed=3)


def test_follow_sources_copies_each_rows_new_slots_from_its_source():
    """Rows 0-2 a group (0 and 1 swap, 2 follows 0), rows 3-4 a group whose beams stayed, rows 5-6
    a group over more blocks (6 follows 5), row 7 alone. Slots from first_new to end come from
    the source row, in one to three blocks; the rest stays (a copy: exact). The blocks start
    before first_new (slot 5 is in block 0), so slots 0-4 may take the source's values: in a beam
    group those are its prompt's, alike in every row; here they are compared only where they
    are not copied. Slots past end may take the source's values too (never attended before
    being written)."""
    rng = np.random.default_rng(0)
    cache = ((tf.constant(rng.normal(size=[8, 2, 64, 3]), tf.float32),
              tf.constant(rng.normal(size=[8, 2, 64, 3]), tf.float32)),)
    source = [1, 0, 0, 3, 4, 5, 5, 7]
    members = [[0, 1, 2]] * 3 + [[3, 4, 4]] * 2 + [[5, 6, 6]] * 2 + [[7, 7, 7]]
    first_new = [5] * 3 + [9] * 2 + [20] * 2 + [9]
    end = [5 + REORDER_CHUNK + 3] * 3 + [30] * 2 + [20 + 2 * REORDER_CHUNK + 1] * 2 + [30]
    got = follow_sources(cache, tf.constant(source), tf.constant(members), tf.constant(first_new),
                         tf.constant(end))
    for before, after in zip(tf.nest.flatten(cache), tf.nest.flatten(got)):
        before, after = before.numpy(), after.numpy()
        for row in range(8):
            new = slice(first_new[row], end[row])
            np.testing.assert_array_equal(after[row, :, new], before[source[row], :, new])
            np.testing.assert_array_equal(after[row, :, :first_new[row] // REORDER_CHUNK * REORDER_CHUNK],
                                          before[row, :, :first_new[row] // REORDER_CHUNK * REORDER_CHUNK])
        for row in (3, 4, 7):        # no beam of theirs moved: untouched
            np.testing.assert_array_equal(after[row], before[row])


def serve_all(scheduler: Scheduler, prompts: list[list[int]], configs: list[GenerationConfig],
              finished: list[int] | None = None) -> dict[int, dict[int, object]]:
    """Submit request i = (prompts[i], configs[i]) to the scheduler, run it until every sequence
    finished -> {request: {sequence: Generation}}; `finished` records the order requests ended in."""
    finished = [] if finished is None else finished
    results: dict[int, dict[int, object]] = {}
    done = threading.Event()
    total = sum(c.num_return_sequences for c in configs)

    def sink(index):
        def receive(kind, sequence, payload):
            assert kind != "error", payload
            if kind == "finish":
                results.setdefault(index, {})[sequence] = payload
                finished.append(index)
                if len(finished) == total:
                    done.set()
        return receive
    for index, (prompt, config) in enumerate(zip(prompts, configs)):
        scheduler.submit(Job(prompt, config, config.seed, sink(index)))
    scheduler.start()
    assert done.wait(120)
    scheduler.stop(30)
    return results


def assert_answers_equal(results: dict[int, dict[int, object]], expected: list, configs: list[GenerationConfig]):
    """Every request's sequences are the Generator's: tokens and finish reasons exactly, beam scores
    within SCORE_ATOL."""
    for index, config in enumerate(configs):
        got = [results[index][s] for s in range(config.num_return_sequences)]
        assert [g.token_ids for g in got] == [e.token_ids for e in expected[index]], index
        assert [g.finish_reason for g in got] == [e.finish_reason for e in expected[index]], index
        if config.num_beams > 1:
            np.testing.assert_allclose([g.score for g in got], [e.score for e in expected[index]], atol=SCORE_ATOL)


def test_beam_groups_share_the_step_with_other_rows_and_answer_as_the_generator(model):
    """Eight slots, seven requests: a 3-beam group (early_stopping=True, min_new_tokens, two answers),
    a 2-beam group with length penalty 2 that ends while the others run, a greedy and a sampled row;
    then a 2-beam group (early_stopping="never", length penalty 1.5) that must wait for two slots,
    a greedy request queued behind it (FIFO: it does not overtake, though one slot is free), and a
    one-token 2-beam group whose search ends at its admission."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 97, size=n).tolist() for n in (4, 11, 7, 9, 5, 3, 6)]
    generator = Generator(model, compile_mode="eager")
    # a stop id the 3-beam search meets mid-way, so finished lists fill before max_new_tokens
    stop = generator.generate([prompts[0]], GenerationConfig(max_new_tokens=8, num_beams=3))[0].token_ids[3]
    configs = [
        GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2, early_stopping=True,
                         min_new_tokens=2, stop_token_ids=(stop,)),
        GenerationConfig(max_new_tokens=3, num_beams=2, length_penalty=2.0, stop_token_ids=(stop,)),
        GenerationConfig(max_new_tokens=10),
        GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, seed=5),
        GenerationConfig(max_new_tokens=20, num_beams=2, early_stopping="never", length_penalty=1.5,
                         stop_token_ids=(stop,)),
        GenerationConfig(max_new_tokens=5),
        GenerationConfig(max_new_tokens=1, num_beams=2, stop_token_ids=(stop,)),
    ]
    expected = [generator.generate([p], c, seeds=[c.seed]) for p, c in zip(prompts, configs)]

    scheduler = Scheduler(model, slots=8, cache_length=64, compile_mode="graph", steps_per_call=3, max_beams=3)
    joined, finished = [], []
    join = scheduler._join

    def record_join(job, rows):
        joined.append(prompts.index(job.prompt_ids))
        join(job, rows)
    scheduler._join = record_join
    results = serve_all(scheduler, prompts, configs, finished)
    assert_answers_equal(results, expected, configs)
    assert len(results[4][0].token_ids) > REORDER_CHUNK       # its beams' caches moved in more than one chunk
    reasons = {results[i][0].finish_reason for i in (0, 1, 4)}
    assert reasons == {"stop", "length"}             # the stop id ended some beams, max_new_tokens others
    assert finished.index(1) < finished.index(2)     # the short group ended while the greedy row decoded
    # FIFO: the 2-beam request waited for two slots and the greedy one behind it waited too
    assert joined == list(range(len(configs)))
    assert scheduler.busy_rows == 0


def test_bad_words_decode_in_the_slots_and_answer_as_the_generator(model):
    """Greedy, sampled and 2-beam requests with bad words (one- and two-token words taken from
    each request's own free run, so they bite) decode in the slot batch, each equal to the
    Generator's answer alone; a request past the table's caps (17 words) runs whole through the
    Generator, with the same answer."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 97, size=n).tolist() for n in (6, 9, 4, 7)]
    generator = Generator(model, compile_mode="eager")
    free = [GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=8, do_sample=True, seed=7),
            GenerationConfig(max_new_tokens=8, num_beams=2), GenerationConfig(max_new_tokens=8)]
    configs = []
    for prompt, config in zip(prompts, free):
        run = generator.generate([prompt], config, seeds=[config.seed])[0].token_ids
        words = ((run[5],), (run[2], run[3]))
        if config is free[3]:
            words += tuple((90, 91 + i % 5, i) for i in range(15))      # 17 words: past MAX_BAD_WORDS
        configs.append(replace(config, bad_words_ids=words))
    expected = [generator.generate([p], c, seeds=[c.seed]) for p, c in zip(prompts, configs)]
    for config, answer, prompt in zip(free, expected, prompts):
        assert answer[0].token_ids != generator.generate([prompt], config, seeds=[config.seed])[0].token_ids

    scheduler = Scheduler(model, slots=8, cache_length=64, compile_mode="graph", steps_per_call=3, max_beams=2)
    assert [scheduler.rows_needed(Job(p, c, c.seed, None)) for p, c in zip(prompts, configs)] == [1, 1, 2, 0]
    assert_answers_equal(serve_all(scheduler, prompts, configs), expected, configs)
