"""evaluate: ROUGE equals rouge-score's, beam outputs equal transformers' generate on a
converted tiny model, and a killed run resumes without redoing or losing articles."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import yaml

from config.params import parse_params
from fine_tuning.abstractive_summarization import evaluate as evaluate_module
from fine_tuning.abstractive_summarization import rouge
from fine_tuning.abstractive_summarization.evaluate import (evaluate, load_eval_articles, mlperf_generation_config,
                                                            summarize_batch)
from fine_tuning.abstractive_summarization.layout import generation_prompt
from generation.generator import Generator
from model import GPTJModel
from tests.data_helpers import make_tiny_tokenizer
from tests.generation_helpers import converted_pair, hf_generate, random_prompts

PREDICTIONS = ["The cat sat on the mat. It was happy.", "  Stocks rose sharply on Monday.  ",
               "Mr. Smith went to Washington. He met the president."]
REFERENCES = ["A cat sat on a mat.\nThe cat was happy.", "Stocks fell on Monday after a bad report.",
              "Smith visited Washington. He met the President on Tuesday."]


def test_rouge_equals_rouge_score_on_fixed_strings():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    # one sentence per line, split by hand where the sentences end
    preds = ["The cat sat on the mat.\nIt was happy.", "Stocks rose sharply on Monday.",
             "Mr. Smith went to Washington.\nHe met the president."]
    refs = ["A cat sat on a mat.\nThe cat was happy.", "Stocks fell on Monday after a bad report.",
            "Smith visited Washington.\nHe met the President on Tuesday."]
    assert [rouge.postprocess(p) for p in PREDICTIONS] == preds
    assert [rouge.postprocess(r) for r in REFERENCES] == refs
    per_sample = [scorer.score(r, p) for p, r in zip(preds, refs)]
    result = rouge.score_summaries(PREDICTIONS, REFERENCES)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[name] == round(float(np.mean([s[name].fmeasure for s in per_sample])) * 100, 4)
    assert result["gen_len"] == sum(len(p) for p in preds) and result["gen_num"] == 3
    # Lsum reads the lines: the two-sentence pair scores differently with and without them
    assert rouge.rouge_scores(preds[0], refs[0])["rougeLsum"] != rouge.rouge_scores(
        preds[0].replace("\n", " "), refs[0].replace("\n", " "))["rougeLsum"]


def test_sentence_splitter_knows_english_abbreviations():
    assert rouge.split_sentences("Mr. Smith arrived at 5 p.m. on Friday. Dr. Jones left.") == [
        "Mr. Smith arrived at 5 p.m. on Friday.", "Dr. Jones left."]
    assert rouge.split_sentences('He said "stop." Then he left! Why?') == ['He said "stop."', "Then he left!", "Why?"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return converted_pair("gptj_basic", str(tmp_path_factory.mktemp("gptj")))


def test_beam_summaries_equal_transformers_generate(pair, tmp_path):
    tokenizer = make_tiny_tokenizer(str(tmp_path / "tok"))       # decodes ids < 101; ids are compared
    sep = pair.vocab_size - 1
    articles = random_prompts(pair.vocab_size - 1, (9, 4, 13), seed=7)
    prompts = [generation_prompt(a, eos_id=0, sep_id=sep, max_input_tokens=12)[0] for a in articles]
    assert [len(p) for p in prompts] == [11, 6, 12]            # the last article cut to fit 12 with its frame
    settings = dict(num_beams=4, min_new_tokens=6, max_new_tokens=20, early_stopping=True)
    free_run = hf_generate(pair.hf, prompts, do_sample=False, **settings)
    eos = free_run[0][8]                  # a token the reference produces after min_new_tokens: rows stop at it
    prompts = [[eos if t == 0 else t for t in p] for p in prompts]   # the frame's eos is the stop token
    expected = hf_generate(pair.hf, prompts, (eos,), do_sample=False, **settings)
    config = mlperf_generation_config(eos, num_beams=4, min_new_tokens=6, max_new_tokens=20)
    outputs = summarize_batch(Generator(pair.ours, "eager", 8), tokenizer, prompts, config, batch_size=4)
    assert [ids for _, ids, _ in outputs] == [e[:-1] if e[-1] == eos else e for e in expected]
    assert any(finish == "stop" for _, _, finish in outputs)
    assert all(len(ids) >= 6 for _, ids, _ in outputs)


# ---------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = make_tiny_tokenizer(str(root / "tok"))
    params = parse_params({"model": {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4,
                                     "rotary_dim": 4, "filter_size": 64, "max_position_embeddings": 128}})
    model = GPTJModel(params.model, seed=3)
    with open(root / "articles.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": f"n{i}", "article": f"doc {i}: the model reads " + "data token " * i,
                                "highlights": f"Summary {i} of the data."}) + "\n")
    return root, tokenizer, params, model


def test_a_killed_evaluate_resumes_without_redoing_or_losing_articles(tiny_setup, tmp_path, monkeypatch):
    root, tokenizer, params, model = tiny_setup
    articles = load_eval_articles([str(root / "articles.jsonl")], tokenizer, sep_id=330, max_input_tokens=64)
    config = mlperf_generation_config(tokenizer.eos_id, num_beams=2, min_new_tokens=2, max_new_tokens=6)
    common = dict(batch_size=2, settings={"run": 1}, progress=False, compile_mode="eager")
    whole = evaluate(model, tokenizer, articles, config, str(tmp_path / "whole"), **common)

    calls, real_generate = [], Generator.generate

    def counting_generate(self, prompts, *args, **kwargs):
        calls.append([list(p) for p in prompts])
        if len(calls) == 3:
            raise KeyboardInterrupt            # killed while generating the third batch
        return real_generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", counting_generate)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, articles, config, str(out), **common)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 and not (out / "rouge.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"index": 4, "id": "n4", "refer')                  # a write torn by the kill
    calls.clear()
    resumed = evaluate(model, tokenizer, articles, config, str(out), **common)
    assert len(calls) == 2                                          # batches [4, 5] and [6]: nothing redone
    assert calls[0][:2] == [articles[4].prompt_ids, articles[5].prompt_ids]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == list(range(7))     # each article once
    expected = [json.loads(line) for line in (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()]
    assert lines == expected and resumed == whole
    assert json.loads((out / "rouge.json").read_text()) == whole and whole["gen_num"] == 7
    with pytest.raises(Exception, match="other settings"):
        evaluate(model, tokenizer, articles, config, str(out), **{**common, "settings": {"run": 2}})


def test_cli_scores_a_checkpoint_and_rejects_bad_flags(tiny_setup, tmp_path, capsys):
    root, tokenizer, params, model = tiny_setup
    tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "ckpt"))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"model": {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2,
                                                     "num_heads": 4, "rotary_dim": 4, "filter_size": 64,
                                                     "max_position_embeddings": 128}}))
    base = ["--params", str(params_path), "--checkpoint_path", str(tmp_path / "ckpt"), "--input",
            str(root / "articles.jsonl"), "--tokenizer", str(root / "tok"), "--output-dir", str(tmp_path / "out"),
            "--no-progress", "--generation-compile", "eager", "--sep-id", "330", "--limit", "3"]
    assert evaluate_module.main(base + ["--num-beams", "2", "--min-new-tokens", "1", "--max-new-tokens", "4",
                                        "--max-input-tokens", "100"]) == 0
    result = json.loads((tmp_path / "out" / "rouge.json").read_text())
    assert result["gen_num"] == 3 and set(result) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}
    capsys.readouterr()
    assert evaluate_module.main(base + ["--max-new-tokens", "64"]) == 2           # 1919 + 64 > 128 positions
    assert "error: --max-input-tokens 1919 + --max-new-tokens 64 exceed" in capsys.readouterr().err
    assert evaluate_module.main(base + ["--max-input-tokens", "60", "--max-new-tokens", "8", "--min-new-tokens", "1",
                                        "--sep-id", "5"]) == 2
    assert "collides with the tokenizer's token" in capsys.readouterr().err
