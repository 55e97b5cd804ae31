"""run.py --mode predict: prompts files, decoding flags, output, streaming, bad input."""
from __future__ import annotations

import json
import os

import pytest
import tensorflow as tf
import yaml

import run
from generation.flags import config_from_flags
from model import GPTJModel
from config.params import parse_params
from tests.data_helpers import make_tiny_tokenizer
from tests.runtime_helpers import raw_params

VOCAB = 320     # fits the tiny tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """params.yaml, a tokenizer, and a checkpoint of random weights to pass as --checkpoint_path."""
    root = tmp_path_factory.mktemp("predict")
    raw = raw_params(str(root), model={"vocab_size": VOCAB})
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    model = GPTJModel(parse_params(raw).model, seed=5)
    checkpoint = tf.train.Checkpoint(model=model).write(str(root / "weights" / "ckpt"))
    tokenizer_dir = str(root / "tok")
    return {"params": str(params_path), "checkpoint": checkpoint, "tokenizer_dir": tokenizer_dir,
            "tokenizer": make_tiny_tokenizer(tokenizer_dir, vocab_size=VOCAB), "root": root}


def predict_argv(setup, model_dir, *extra: str) -> list[str]:
    return ["--mode", "predict", "--params", setup["params"], "--model_dir", str(model_dir),
            "--checkpoint_path", setup["checkpoint"], "--tokenizer", setup["tokenizer_dir"],
            "--generation_compile", "eager", *extra]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_single_prompt_is_streamed_and_recorded(setup, tmp_path, capsys):
    argv = predict_argv(setup, tmp_path, "--prompt", "the cat", "--max_new_tokens", "6", "--do_sample",
                        "--seed", "3", "--top_k", "20", "--temperature", "0.8")
    assert run.main(argv) == 0
    (record,) = read_jsonl(tmp_path / "predictions.jsonl")
    assert capsys.readouterr().out.endswith(record["completion"] + "\n")
    assert record["completion"] == setup["tokenizer"].decode(record["token_ids"])
    assert run.main(argv) == 0                                       # same seed, same sample; appended
    assert read_jsonl(tmp_path / "predictions.jsonl") == [record, record]


def test_prompts_file_in_batches_with_beam_search_to_output(setup, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\ndef add(a, b):\nmodel layer\n")
    output = tmp_path / "out" / "beams.jsonl"
    assert run.main(predict_argv(setup, tmp_path / "m", "--prompts_file", str(prompts), "--num_beams", "3",
                                 "--num_return_sequences", "2", "--batch_size", "2", "--max_new_tokens", "4",
                                 "--ignore_eos", "--output", str(output))) == 0
    records = read_jsonl(output)
    assert [(r["prompt"], r["sequence"]) for r in records] == [
        ("the cat", 0), ("the cat", 1), ("def add(a, b):", 0), ("def add(a, b):", 1), ("model layer", 0),
        ("model layer", 1)]
    for record in records:
        assert record["finish_reason"] == "length" and len(record["token_ids"]) == 4
        assert record["stop"] is None and record["score"] < 0
    for best, second in zip(records[::2], records[1::2]):
        assert best["score"] >= second["score"] and best["token_ids"] != second["token_ids"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["completion"] for p in printed] == [r["completion"] for r in records]


def test_decoding_flags_map_to_the_config(setup):
    args = run.build_parser().parse_args([
        "--mode", "predict", "--params", "p", "--prompt", "x", "--max_new_tokens", "9", "--min_new_tokens", "2",
        "--do_sample", "--temperature", "0.5", "--top_k", "7", "--top_p", "0.9", "--repetition_penalty", "1.2",
        "--stop", "\n\n", "--stop", "END", "--stop_token_id", "3", "--bad_words", "the", "--seed", "11",
        "--early_stopping", "never", "--length_penalty", "0.5"])
    tokenizer = setup["tokenizer"]
    config = config_from_flags(args, tokenizer)
    assert (config.max_new_tokens, config.min_new_tokens, config.do_sample, config.temperature) == (9, 2, True, 0.5)
    assert (config.top_k, config.top_p, config.repetition_penalty, config.seed) == (7, 0.9, 1.2, 11)
    assert config.stop_strings == ("\n\n", "END") and config.stop_token_ids == (tokenizer.eos_id, 3)
    assert config.bad_words_ids == (tuple(tokenizer.encode("the")),)
    assert (config.early_stopping, config.length_penalty) == ("never", 0.5)
    args.ignore_eos = True
    assert config_from_flags(args, tokenizer).stop_token_ids == (3,)


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "the", "--top_p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--prompt", "the", "--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--prompt", "the", "--num_beams", "0"], "num_beams=0 must be an integer >= 1"),
    (["--prompt", "the", "--do_sample", "--temperature", "0"], "temperature=0.0 must be > 0 when sampling"),
    (["--prompt", "the", "--stop_token_id", "320"], "stop token id 320 is outside the model vocabulary"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "the cat sat on the mat", "--max_new_tokens", "30"],
     "model.max_position_embeddings=32 leaves room for at most 2 with max_new_tokens=30"),
    (["--prompt", "the", "--max_new_tokens", "100000"],
     "max_new_tokens=100000 leaves no position for the prompt: model.max_position_embeddings=32"),
    (["--prompt", "the", "--num_beams", "2", "--stop", "x"], "stop strings work with greedy decoding and sampling"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "prompts file /nonexistent/prompts.txt does not exist"),
    (["--prompt", "a", "--prompts_file", "f.txt"], "give exactly one of --prompt and --prompts-file"),
    ([], "--mode predict needs --prompt and --tokenizer"),
    (["--prompt", "a", "--batch_size", "0"], "--batch-size=0 must be >= 1"),
])
def test_bad_input_exits_2_with_one_error_line(setup, tmp_path, capsys, extra, message):
    assert run.main(predict_argv(setup, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not os.path.exists(tmp_path / "predictions.jsonl")


def test_predict_needs_weights(setup, tmp_path, capsys):
    argv = [a for a in predict_argv(setup, tmp_path, "--prompt", "a", "--max_new_tokens", "2")
            if a != setup["checkpoint"]]
    argv.remove("--checkpoint_path")
    assert run.main(argv) == 2
    assert "holds no checkpoint and no --checkpoint-path" in capsys.readouterr().err


def test_one_flag_style_with_underscores_accepted():
    """Hyphens are the canonical spelling; underscores are read as the same flag (not as a value)."""
    hyphens = run.build_parser().parse_args(["--mode", "predict", "--params", "p", "--model-dir", "m",
                                             "--max-new-tokens", "5", "--prompt", "--top_p=0.5 as text"])
    underscores = run.build_parser().parse_args(["--mode", "predict", "--params", "p", "--model_dir", "m",
                                                 "--max_new_tokens=5", "--prompt", "--top_p=0.5 as text"])
    assert vars(hyphens) == vars(underscores)
    assert (hyphens.model_dir, hyphens.max_new_tokens, hyphens.prompt) == ("m", 5, "--top_p=0.5 as text")
    help_text = run.build_parser().format_help()
    assert "--model-dir" in help_text and "--model_dir MODEL_DIR" not in help_text


def test_weight_format_int8_decodes_with_the_int8_model(setup, tmp_path):
    """run.py --weight-format int8 (XLA) gives the greedy tokens of the int8 GenerationModel run
    eagerly (the two differ by float32 rounding; the random model's top logits sit ~1e-2 apart)."""
    from generation.config import GenerationConfig
    from generation.generator import Generator
    from generation.weights import GenerationModel
    argv = predict_argv(setup, tmp_path, "--prompt", "the cat", "--max_new_tokens", "6", "--weight_format", "int8")
    argv[argv.index("--generation_compile") + 1] = "xla"
    assert run.main(argv) == 0
    (record,) = read_jsonl(tmp_path / "predictions.jsonl")
    model = GPTJModel(parse_params(yaml.safe_load(open(setup["params"]))).model, seed=5)
    tf.train.Checkpoint(model=model).read(setup["checkpoint"]).expect_partial()
    prompt = setup["tokenizer"].encode("the cat")
    config = GenerationConfig(max_new_tokens=6, pad_token_id=setup["tokenizer"].eos_id,
                              stop_token_ids=(setup["tokenizer"].eos_id,))
    int8 = Generator(GenerationModel(model, "int8"), "eager").generate([prompt], config)[0].token_ids
    assert record["token_ids"] == int8
