"""bench/mlperf end to end on a random tiny GPT-J and a handful of local CNN/DailyMail-format
samples: LoadGen writes its summary in both scenarios, the accuracy log holds exactly what the
generator gives for each sample, and the accuracy script prints the project's ROUGE of it.
Without TensorFlow: the invented-article maker's lengths and format, --find-peak's search on a
scripted latency source, the summary reader, the wall-time estimate and the sizing checks."""
from __future__ import annotations

import json

import pytest

from bench.mlperf import accuracy, estimate, make_dataset, run, sizing
from bench.mlperf.dataset import (INSTRUCTION, MAX_INPUT_TOKENS, PROMPT_TEMPLATE, Sample, generation_config,
                                  load_samples, prompt_ids)
from bench.mlperf.peak import Round, find_peak, next_target
from bench.mlperf.summary import read_summary
from config.params import ModelParams
from generation.generator import Generator
from tests.data_helpers import make_tiny_tokenizer

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
    p99 = read_summary(summary).p99_s
    assert p99 is not None and p99 > 0
    assert f"Server p99 latency {p99:.2f} s   target <= 20 s" in printed
    # the run's directory says what ran: the command line and the summary's figures
    command = (out / "command.txt").read_text()
    assert command.startswith("python -m bench.mlperf.run --tiny --scenario Server") and str(out) in command
    record = json.loads((out / "result.json").read_text())
    assert record["summary"]["p99_s"] == p99 and record["summary"]["scenario"] == "Server"
    settings = detail(out)
    assert (settings["effective_scenario"], settings["effective_test_mode"]) == ("Server", "PerformanceOnly")
    assert settings["effective_performance_sample_count"] == COUNT
    assert "Completed samples per second" in summary


def test_an_earlier_runs_directory_is_refused(tmp_path, capsys):
    (tmp_path / "mlperf_log_summary.txt").write_text("an earlier run")
    assert run.main(["--tiny", "--scenario", "Offline", "--output-dir", str(tmp_path)]) == 2
    assert "holds an earlier run's logs; give a new directory" in capsys.readouterr().err
    assert run.main(["--tiny", "--scenario", "Offline", "--find-peak", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--find-peak searches the Server scenario's QPS" in capsys.readouterr().err


# ---- the invented-article maker ---------------------------------------------------------------

def test_made_articles_fall_in_the_token_range_in_cnn_eval_format(tmp_path, capsys):
    tokenizer = make_tiny_tokenizer(str(tmp_path / "tok"))
    out = tmp_path / "cnn_eval_invented.json"
    flags = ["--samples", "5", "--tokenizer", str(tmp_path / "tok"), "--min-tokens", "600", "--max-tokens", "1900"]
    assert make_dataset.main(["--out", str(out), *flags, "--seed", "3"]) == 0
    records = json.loads(out.read_text())
    assert [list(r) for r in records] == [["instruction", "input", "output"]] * 5       # cnn_eval.json's keys
    lengths = [len(tokenizer.encode(PROMPT_TEMPLATE.format(instruction=r["instruction"], input=r["input"])))
               for r in records]
    assert all(600 <= n <= 1900 for n in lengths), lengths
    assert len(set(lengths)) == 5                           # drawn across the range, not one length
    for record, sample in zip(records, load_samples(str(out))):
        assert record["instruction"] == INSTRUCTION
        assert len(prompt_ids(tokenizer, sample)) == len(tokenizer.encode(
            PROMPT_TEMPLATE.format(instruction=INSTRUCTION, input=record["input"])))   # under 1,919: never cut
        highlights = record["output"].split("\n")
        assert 3 <= len(highlights) <= 4 and all(h.endswith(".") for h in highlights)
        for line in highlights:                             # shortened copies of the article's sentences
            assert line[:-1] in record["input"].replace(",", "")
    assert f"prompts {min(lengths)}-{max(lengths)} tokens" in capsys.readouterr().out
    again = tmp_path / "again.json"
    assert make_dataset.main(["--out", str(again), *flags, "--seed", "3"]) == 0
    assert again.read_text() == out.read_text()             # seeded
    assert make_dataset.main(["--out", str(again), *flags, "--seed", "4"]) == 0
    assert again.read_text() != out.read_text()


def test_the_maker_refuses_what_it_cannot_make(tmp_path, capsys):
    make_tiny_tokenizer(str(tmp_path / "tok"))
    base = ["--out", str(tmp_path / "x.json"), "--samples", "1", "--tokenizer", str(tmp_path / "tok")]
    assert make_dataset.main([*base, "--min-tokens", "900", "--max-tokens", "800"]) == 2
    assert "--min-tokens 900 exceeds --max-tokens 800" in capsys.readouterr().err
    assert make_dataset.main([*base, "--min-tokens", "20"]) == 2
    assert "MLPerf's prompt template alone is" in capsys.readouterr().err
    assert make_dataset.main([*base, "--model-vocab", "100"]) == 2
    assert "--model-vocab=100" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ---- --find-peak on a scripted latency source -------------------------------------------------

SERVICE_S = 4.0


def queue_p99(qps: float) -> float:
    """A made-up server: 4 s per sample alone, p99 growing as 1 + 4.6 rho / (1 - rho) with the load
    rho = qps x 4 s (an M/M/1-like queue), unbounded at rho >= 1. Meets 20 s up to rho = 4 / 8.6."""
    rho = qps * SERVICE_S
    return 1e9 if rho >= 1 else SERVICE_S * (1 + 4.6 * rho / (1 - rho))


PEAK_QPS = 4 / 8.6 / SERVICE_S


def scripted(p99_of):
    asked = []

    def measure(qps):
        asked.append(qps)
        return Round(qps, p99_of(qps), min_latency_s=SERVICE_S, result="INVALID")
    return measure, asked


def test_find_peak_lowers_the_target_until_p99_meets_the_bound_then_bisects():
    measure, asked = scripted(queue_p99)
    lines = []
    peak = find_peak(measure, 0.25, 20.0, max_rounds=8, report=lines.append)
    assert asked[0] == 0.25 and asked[1] < asked[0] and asked[2] < asked[1]     # decreasing while it misses
    assert peak.best is not None and peak.best.p99_s <= 20.0
    assert PEAK_QPS / 1.1 <= peak.best.target_qps <= PEAK_QPS                   # within the 10% precision
    assert len(asked) <= 6 and "within 10%" in peak.reason
    assert len(lines) == 2 * len(asked) and "find-peak round 1/8: target 0.25 QPS" in lines[0]


def test_find_peak_stops_when_a_sample_alone_exceeds_the_bound():
    def slow(qps):                          # a 6B sample on 2 cores: minutes alone
        return Round(qps, 600.0, min_latency_s=480.0)
    peak = find_peak(slow, 0.002, 20.0, max_rounds=5, report=lambda line: None)
    assert len(peak.rounds) == 1 and peak.best is None
    assert "even the fastest sample took 480.0 s" in peak.reason and "no target QPS can meet it" in peak.reason


def test_find_peak_keeps_to_its_rounds_and_its_ceiling():
    measure, asked = scripted(lambda qps: 30.0)                       # misses at every rate
    peak = find_peak(measure, 1.0, 20.0, max_rounds=3, report=lambda line: None)
    assert len(asked) == 3 and asked == sorted(asked, reverse=True) and peak.best is None
    assert asked[1] == pytest.approx(1.0 * 20 / 30)                  # lowered by bound / p99
    measure, asked = scripted(lambda qps: 5.0)                        # meets at every rate: raised to the ceiling
    peak = find_peak(measure, 1.0, 20.0, max_rounds=5, ceiling=2.0, report=lambda line: None)
    assert asked == [1.0, 1.5, 2.0] and peak.best.target_qps == 2.0 and "ceiling" in peak.reason
    assert next_target([Round(1.0, None)], 20.0)[0] is None


# ---- the summary reader, the estimate, the sizing ---------------------------------------------

SERVER_SUMMARY = """================================================
MLPerf Results Summary
================================================
SUT name : PySUT
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 0.86
Completed tokens per second (inferred): 59.19
Result is : INVALID
  Performance constraints satisfied : Yes
  Min duration satisfied : Yes
  Min queries satisfied : Yes
  Early stopping satisfied: NO
Recommendations:
Early Stopping Result:
 * Run unsuccessful.
 * Processed 8 queries.
 * Would need to run at least 451 more queries,
 with the run being successful if every additional
 query were under latency.

================================================
Additional Stats
================================================
Scheduled samples per second : 0.87
Min latency (ns)                : 133597977
Max latency (ns)                : 4474618353
Mean latency (ns)               : 1874550114
50.00 percentile latency (ns)   : 1812198415
99.00 percentile latency (ns)   : 4474618353

================================================
Test Parameters Used
================================================
samples_per_query : 1
target_qps : 1
"""


def test_summary_reader_keeps_the_figures_and_why_a_run_is_invalid():
    summary = read_summary(SERVER_SUMMARY)
    assert (summary.scenario, summary.mode, summary.result) == ("Server", "PerformanceOnly", "INVALID")
    assert (summary.samples_per_s, summary.scheduled_per_s, summary.tokens_per_s) == (0.86, 0.87, 59.19)
    assert summary.p99_s == 4.474618353 and summary.min_latency_s == 0.133597977 and summary.target_qps == 1
    assert summary.unmet == ("Early stopping",)
    assert summary.early_stopping[2] == ("Would need to run at least 451 more queries, with the run being "
                                         "successful if every additional query were under latency.")


GPTJ_6B = ModelParams(vocab_size=50400, hidden_size=4096, num_hidden_layers=28, num_heads=16, rotary_dim=64,
                      filter_size=16384, max_position_embeddings=2048)


def test_estimate_reproduces_the_measured_rates_and_grows_with_the_cache():
    # a 256-token prompt is what the beam rate was measured with (cache 384 slots): 128 steps at 0.35/s
    short = estimate.offline_estimate([256], "int8")
    assert short.decode_s == pytest.approx(128 / 0.35) and short.prefill_s == pytest.approx(256 / 14.2)
    long = estimate.offline_estimate([1919], "int8")
    assert long.prefill_s == pytest.approx(1920 / 14.2)                # padded to the 32-token bucket
    assert long.decode_s > short.decode_s                               # 4 beams x 2,048 slots of float32 cache
    assert estimate.offline_estimate([1919], "int8", value_bytes=2).decode_s < long.decode_s
    assert estimate.offline_estimate([600, 610, 1900], "int8").shapes == 3
    assert estimate.offline_estimate([600, 610, 1900], "int8", bucket=128).shapes == 2
    assert any("no target QPS can meet it" in line for line in estimate.describe(long, 20.0))
    assert estimate.covered(GPTJ_6B, "int8") is None
    assert "float32" in estimate.covered(GPTJ_6B, "float32")


def test_sizing_counts_each_prompt_shape_and_offers_a_bfloat16_cache():
    args = run.build_parser().parse_args(["--scenario", "Offline", "--weight-format", "int8"])
    one = sizing.memory_estimate(GPTJ_6B, args, [1900, 1910])
    eight = sizing.memory_estimate(GPTJ_6B, args, [700 + 150 * k for k in range(8)])
    assert eight.total > one.total and "14 more compiled prefills" in dict(eight.terms)
    assert "--dtype bfloat16" in dict(one.fixes) and dict(one.fixes)["--dtype bfloat16"] < one.total
    with pytest.raises(ValueError, match="use --prompt-bucket 128"):
        sizing.check_prompt_bucket(256, [[1] * 1900], 2048, 128)
    sizing.check_prompt_bucket(128, [[1] * 1919], 2048, 128)
