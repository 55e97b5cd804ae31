"""bench/mlperf end to end on a random tiny GPT-J and a handful of local CNN/DailyMail-format
samples: LoadGen writes its summary in both scenarios, the accuracy log holds exactly what the
generator gives for each sample, and the accuracy script prints the project's ROUGE of it."""
from __future__ import annotations

import json

import pytest

from bench.mlperf import accuracy, run
from bench.mlperf.dataset import MAX_INPUT_TOKENS, PROMPT_TEMPLATE, Sample, generation_config, load_samples, prompt_ids
from generation.generator import Generator

COUNT = 4


def detail(log_dir) -> dict:
    """LoadGen's settings and results by key, from mlperf_log_detail.txt's MLLOG lines."""
    entries = [json.loads(line.split(":::MLLOG", 1)[1]) for line in
               (log_dir / "mlperf_log_detail.txt").read_text().splitlines() if ":::MLLOG" in line]
    return {entry["key"]: entry["value"] for entry in entries}


def test_prompt_is_the_alpaca_template_cut_to_1919_tokens():
    class Characters:                            # one token per character: lengths are easy to see
        def encode(self, text):
            return [ord(c) for c in text]
    sample = Sample(article="x" * 3000, reference="")
    ids = prompt_ids(Characters(), sample)
    assert len(ids) == MAX_INPUT_TOKENS
    text = "".join(map(chr, ids))
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nSummarize the following news article:\n\n### Input:\nxxx" in text
    assert "### Response:" not in text           # cut on the right, as MLPerf does
    short = "".join(map(chr, prompt_ids(Characters(), Sample(article="A short one.", reference=""))))
    assert short == PROMPT_TEMPLATE.format(instruction=sample.instruction, input="A short one.")
    assert short.endswith("### Input:\nA short one.\n\n### Response:")


def test_offline_accuracy_run_scores_the_generators_tokens(tmp_path, capsys):
    pytest.importorskip("mlperf_loadgen", reason="LoadGen is the optional `mlperf` extra")
    out = tmp_path / "offline"
    assert run.main(["--tiny", "--scenario", "Offline", "--mode", "accuracy", "--count", str(COUNT),
                     "--output-dir", str(out), "--compile", "graph"]) == 0
    printed = capsys.readouterr().out
    assert "No errors encountered during test." in (out / "mlperf_log_summary.txt").read_text()
    settings = detail(out)
    assert (settings["effective_scenario"], settings["effective_test_mode"]) == ("Offline", "AccuracyOnly")

    results = accuracy.read_accuracy_log(str(out / "mlperf_log_accuracy.json"))
    assert sorted(results) == list(range(COUNT))
    model, tokenizer, dataset = run.tiny_setup(str(tmp_path / "again"), COUNT)   # the same seeds: the same model
    config = generation_config(tokenizer.eos_id)
    generator = Generator(model, "graph")
    samples = load_samples(dataset)
    for index, sample in enumerate(samples):
        alone = generator.generate([prompt_ids(tokenizer, sample)], config)[0].token_ids
        assert results[index] == alone, index
        assert config.min_new_tokens <= len(alone) <= config.max_new_tokens

    scores = accuracy.score(results, [s.reference for s in samples], tokenizer)
    assert scores["gen_num"] == COUNT
    for line in (f"ROUGE-1    {scores['rouge1']:8.4f}   target >= 42.5566 (99% of 42.9865)",
                 f"ROUGE-2    {scores['rouge2']:8.4f}   target >= 19.9223 (99% of 20.1235)",
                 f"ROUGE-L    {scores['rougeL']:8.4f}   target >= 29.6882 (99% of 29.9881)",
                 f"gen_len    {scores['gen_len']:8d}   target >= 3615190",
                 f"gen_num    {COUNT:8d}"):
        assert line in printed, (line, printed)


def test_server_performance_run_over_http_writes_the_summary(tmp_path, capfd):
    pytest.importorskip("mlperf_loadgen", reason="LoadGen is the optional `mlperf` extra")
    out = tmp_path / "server"
    assert run.main(["--tiny", "--scenario", "Server", "--mode", "performance", "--sut", "http", "--count",
                     str(COUNT), "--http-concurrency", "2", "--output-dir", str(out), "--compile", "graph"]) == 0
    printed = capfd.readouterr().out
    summary = (out / "mlperf_log_summary.txt").read_text()
    assert "Scenario : Server" in summary and "Mode     : PerformanceOnly" in summary
    p99 = run.summary_p99_seconds(summary)
    assert p99 is not None and p99 > 0
    assert f"Server p99 latency {p99:.2f} s   target <= 20 s" in printed
    settings = detail(out)
    assert (settings["effective_scenario"], settings["effective_test_mode"]) == ("Server", "PerformanceOnly")
    assert settings["effective_performance_sample_count"] == COUNT
    assert "Completed samples per second" in summary
