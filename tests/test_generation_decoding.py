"""Decoding behaviour on a tiny random GPTJModel (no reference model needed): sampling
seeds, top-k=1 = greedy, stop tokens and min_new_tokens, streaming, stop strings, bad input."""
from __future__ import annotations

import io
import json

import pytest

from generation.config import GenerationConfig, GenerationConfigError
from generation.generator import Generator
from generation.greedy import greedy_generate
from generation.predict import PromptsFileError, predict, read_prompts
from generation.text import TextStream, complete
from model import GPTJModel
from config.params import InitializerParams, ModelParams
from tests.data_helpers import make_tiny_tokenizer

VOCAB = 320          # fits the tiny byte-level tokenizer of tests/data_helpers.py


@pytest.fixture(scope="module")
def model():
    # A wide init makes the next-token distribution peaked, like a trained model's.
    init = InitializerParams(stddev=0.3)
    config = ModelParams(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, rotary_dim=4,
                         filter_size=64, max_position_embeddings=48, initializer=init,
                         embedding_initializer=init, output_layer_initializer=init)
    return GPTJModel(config, seed=3)


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, compile_mode="eager", length_multiple=8)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=VOCAB)


PROMPTS = [[5, 17, 200, 9], [44], [7, 8, 9, 10, 11, 12, 13]]


def ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def test_sampling_with_top_k_1_is_greedy(generator):
    greedy = GenerationConfig(max_new_tokens=8)
    sampled = greedy.replace(do_sample=True, top_k=1, temperature=0.7, seed=11)
    assert ids(generator.generate(PROMPTS, sampled)) == ids(generator.generate(PROMPTS, greedy))


def test_same_seed_same_sample_and_different_seeds_differ(generator):
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5)
    first = ids(generator.generate(PROMPTS, config, seeds=[1, 2, 3]))
    assert ids(generator.generate(PROMPTS, config, seeds=[1, 2, 3])) == first
    other = ids(generator.generate(PROMPTS, config, seeds=[4, 5, 6]))
    assert all(a != b for a, b in zip(first, other))
    # A request's tokens depend on its seed, not on the rest of its batch.
    alone = ids(generator.generate([PROMPTS[2]], config, seeds=[3]))
    assert alone == [first[2]]
    # config.seed is the default seed of every prompt
    assert ids(generator.generate(PROMPTS, config.replace(seed=2))) == ids(generator.generate(PROMPTS, config,
                                                                                               seeds=[2, 2, 2]))


def test_several_samples_per_prompt_are_distinct_and_reproducible(generator):
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, num_return_sequences=3)
    results = ids(generator.generate(PROMPTS, config, seeds=[1, 2, 3]))
    assert len(results) == 9                                                 # grouped by prompt
    assert ids(generator.generate(PROMPTS, config, seeds=[1, 2, 3])) == results
    for row in range(3):
        samples = results[row * 3:(row + 1) * 3]
        assert len({tuple(s) for s in samples}) == 3
        # the first sample of a request is the one it gets alone, with the same seed
        assert samples[0] == ids(generator.generate([PROMPTS[row]], config.replace(num_return_sequences=1),
                                                    seeds=[row + 1]))[0]


def test_beam_sampling_depends_on_the_seed_only(generator):
    config = GenerationConfig(max_new_tokens=8, num_beams=3, do_sample=True, temperature=2.0, top_k=20,
                              num_return_sequences=2)
    first = generator.generate(PROMPTS, config, seeds=[1, 2, 3])
    assert len(first) == 6 and ids(generator.generate(PROMPTS, config, seeds=[1, 2, 3])) == ids(first)
    other = ids(generator.generate(PROMPTS, config, seeds=[4, 5, 6]))
    assert sum(a != b for a, b in zip(ids(first), other)) >= 3
    assert ids(generator.generate([PROMPTS[1]], config, seeds=[2])) == ids(first)[2:4]
    for best, second in zip(first[::2], first[1::2]):
        assert best.score >= second.score


def test_top_p_and_top_k_restrict_samples_to_the_likely_tokens(generator):
    greedy = ids(generator.generate(PROMPTS, GenerationConfig(max_new_tokens=1)))
    tight = GenerationConfig(max_new_tokens=1, do_sample=True, top_p=1e-6)
    for seed in range(3):
        assert ids(generator.generate(PROMPTS, tight.replace(seed=seed))) == greedy


def test_stop_tokens_and_min_new_tokens(generator):
    free = generator.generate(PROMPTS, GenerationConfig(max_new_tokens=8))
    stop = free[0].token_ids[2]
    results = generator.generate(PROMPTS, GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    for before, after in zip(free, results):
        if stop in before.token_ids:
            cut = before.token_ids.index(stop) + 1
            assert after.token_ids == before.token_ids[:cut]
            assert (after.finish_reason, after.stop) == ("stop", stop)
        else:
            assert after.token_ids == before.token_ids and after.finish_reason == "length"
    late = generator.generate(PROMPTS, GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,), min_new_tokens=5))
    for result in late:
        assert stop not in result.token_ids[:5]
        assert len(result.token_ids) >= 5


def test_bad_words_are_never_generated(generator):
    free = ids(generator.generate(PROMPTS, GenerationConfig(max_new_tokens=8)))
    pair = tuple(free[2][3:5])
    config = GenerationConfig(max_new_tokens=8, bad_words_ids=((free[0][1],), pair))
    for row in ids(generator.generate(PROMPTS, config)):
        assert free[0][1] not in row
        assert all(tuple(row[i:i + 2]) != pair for i in range(len(row) - 1))


def test_streaming_sees_every_step(generator):
    seen = []
    config = GenerationConfig(max_new_tokens=6, do_sample=True, seed=5)
    result = generator.generate([PROMPTS[0]], config, on_tokens=lambda rows: seen.append(list(rows[0])))
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1] == result[0].token_ids
    assert result[0].token_ids == generator.generate([PROMPTS[0]], config)[0].token_ids


def test_one_compiled_decode_step_serves_every_token_and_call(model):
    """XLA (the default): traced once per shape, reused across calls, seeds and prompts;
    samples repeat per seed (XLA's stateless RNG draws other bits than the TF kernels, so a
    seed's sample is reproducible within one compile mode). Greedy XLA decoding is compared
    with transformers in test_generation_parity.py."""
    compiled = Generator(model, compile_mode="xla", length_multiple=16)
    sampling = GenerationConfig(max_new_tokens=7, do_sample=True, top_k=40)
    first = ids(compiled.generate(PROMPTS, sampling, seeds=[1, 2, 3]))
    assert ids(compiled.generate([[3, 4, 5], [6], [9, 9]], sampling, seeds=[1, 2, 3])) != first
    assert ids(compiled.generate(PROMPTS, sampling, seeds=[1, 2, 3])) == first
    assert all(a != b for a, b in zip(first, ids(compiled.generate(PROMPTS, sampling, seeds=[4, 5, 6]))))
    (decoder,) = compiled._decoders.values()
    assert decoder.advance.experimental_get_tracing_count() == 1
    assert decoder.prefill.experimental_get_tracing_count() == 1


def test_greedy_generate_keeps_its_contract(model, generator):
    expected = generator.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=5))[0].token_ids
    new_ids, reason = greedy_generate(model, PROMPTS[0], 5, compile_mode="eager")
    assert (new_ids, reason) == (expected, "length")
    new_ids, reason = greedy_generate(model, PROMPTS[0], 5, stop_id=expected[1], compile_mode="eager")
    assert (new_ids, reason) == (expected[:2], "stop")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        greedy_generate(model, [], 5)


@pytest.mark.parametrize("prompts,settings,message", [
    ([[]], {}, "prompt 0 is empty"),
    ([[1] * 40], dict(max_new_tokens=10), "prompt 0 has 40 tokens but model.max_position_embeddings=48 leaves "
                                          "room for at most 38"),
    ([[1]], dict(stop_token_ids=(VOCAB,)), f"stop token id {VOCAB} is outside the model vocabulary"),
    ([[1]], dict(bad_words_ids=((1, 999),)), "bad_words_ids token id 999 is outside the model vocabulary"),
    ([[1]], dict(stop_strings=("x",)), "stop strings need a tokenizer"),
    ([], {}, "no prompts to generate from"),
])
def test_bad_requests_fail_before_any_work(generator, prompts, settings, message):
    with pytest.raises(GenerationConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generator.generate(prompts, GenerationConfig(**settings))


def test_stop_strings_cut_the_completion_text(generator, tokenizer):
    prompt = "the model"
    free = complete(generator, tokenizer, [prompt], GenerationConfig(max_new_tokens=12))[0]
    assert free.completion == tokenizer.decode(free.token_ids)
    stop_text = free.completion[len(free.completion) // 2:][:2]
    assert stop_text.strip(), f"the free completion {free.completion!r} is too short for this test"
    config = GenerationConfig(max_new_tokens=12, stop_strings=("\x00never", stop_text))
    done = complete(generator, tokenizer, [prompt], config)[0]
    assert done.completion == free.completion[:free.completion.index(stop_text)]
    assert (done.finish_reason, done.stop) == ("stop", stop_text)
    assert free.token_ids[:len(done.token_ids)] == done.token_ids
    assert tokenizer.decode(done.token_ids).find(stop_text) >= 0         # the tokens that spelled it are kept
    assert len(done.token_ids) < len(free.token_ids) or free.completion.endswith(stop_text)


def test_stop_token_is_not_part_of_the_completion(generator, tokenizer):
    free = complete(generator, tokenizer, ["a b"], GenerationConfig(max_new_tokens=6))[0]
    stop = free.token_ids[1]
    done = complete(generator, tokenizer, ["a b"], GenerationConfig(max_new_tokens=6, stop_token_ids=(stop,)))[0]
    assert done.token_ids == free.token_ids[:1] and done.stop == stop
    assert done.completion == tokenizer.decode(done.token_ids)


def test_text_stream_never_shows_what_the_completion_will_not_hold(tokenizer):
    shown = []
    config = GenerationConfig(stop_strings=("END",), stop_token_ids=(tokenizer.eos_id,))
    stream = TextStream(tokenizer, config, shown.append)
    for text in ["hello", "hello E", "hello EN", "hello ENd"]:
        stream.update(tokenizer.encode(text))
    assert "".join(shown) == "hello ENd"
    assert shown[:2] == ["hello", " "]                  # "E" and "EN" were held back as a possible "END"
    shown.clear()
    stream = TextStream(tokenizer, config, shown.append)
    stream.update(tokenizer.encode("ok END more"))
    stream.update(tokenizer.encode("ok END more") + [tokenizer.eos_id])
    assert "".join(shown) == "ok "


def test_streamed_text_equals_the_completion(generator, tokenizer):
    shown = []
    config = GenerationConfig(max_new_tokens=10, do_sample=True, seed=1, stop_token_ids=(tokenizer.eos_id,))
    result = complete(generator, tokenizer, ["def add("], config, on_text=shown.append)[0]
    assert "".join(shown) == result.completion


def test_predict_appends_jsonl_and_reads_prompt_files(model, tokenizer, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "the cat", "seed": 4}\n\n{"prompt": "a"}\n{"prompt": "def"}\n')
    requests = read_prompts(None, str(prompts_file))
    assert [(r.text, r.seed) for r in requests] == [("the cat", 4), ("a", None), ("def", None)]
    config = GenerationConfig(max_new_tokens=4, do_sample=True, seed=9, stop_token_ids=(tokenizer.eos_id,))
    output = tmp_path / "out" / "predictions.jsonl"
    console = io.StringIO()
    first = predict(model, tokenizer, requests, config, str(output), batch_size=2, compile_mode="eager",
                    console=console)
    predict(model, tokenizer, requests, config, str(output), batch_size=3, compile_mode="eager", console=console)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 6 and records[:3] == records[3:]          # batching does not change a sample
    assert [r["prompt"] for r in records[:3]] == ["the cat", "a", "def"]
    assert records[0]["completion"] == first[0].completion
    assert set(records[0]) == {"prompt", "completion", "token_ids", "finish_reason", "stop"}
    assert len(console.getvalue().splitlines()) == 6
    plain = tmp_path / "prompts.txt"
    plain.write_text("one\n\ntwo words\n")
    assert [r.text for r in read_prompts(None, str(plain))] == ["one", "two words"]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "x"}\n{"text": "y"}\n', 'prompts.jsonl:2 has no "prompt" string'),
    ('{"prompt": "x"}\nnot json\n', "prompts.jsonl:2 is not JSON"),
    ('{"prompt": "x", "seed": "s"}\n', '"seed" must be an integer'),
    ("\n\n", "holds no prompt"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(PromptsFileError, match=message):
        read_prompts(None, str(path))
