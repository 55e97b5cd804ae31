"""Score an accuracy run: `mlperf_log_accuracy.json` against the references, as MLPerf does.

    python -m bench.mlperf.accuracy --log-dir LOGS --dataset cnn_eval.json --tokenizer TOK [--dtype int32]

Results are de-duplicated by sample index, decoded without the EOS token, and scored with the
project's ROUGE (fine_tuning/abstractive_summarization/rouge.py: MLPerf's post-processing,
ROUGE-1/2/L/Lsum with stemming, gen_len, gen_num); printed against the reference targets.
"""
from __future__ import annotations

import json
import os
import sys

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

import numpy as np

from config.cli import ArgumentParser

# fp32 reference of MLPerf Inference GPT-J; the 99% target is 0.99 x each, gen_len's is 0.9 x.
REFERENCE = {"rouge1": 42.9865, "rouge2": 20.1235, "rougeL": 29.9881}
REFERENCE_GEN_LEN = 4016878
NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
ROUGE_MISSING = ("ROUGE not computed: fine_tuning/abstractive_summarization/rouge.py (the summarization "
                 "work's scorer) is not in this checkout; merge it to score ROUGE, gen_len and gen_num")


def read_accuracy_log(path: str, dtype: str = "int32") -> dict[int, list[int]]:
    """{sample index: generated ids}, the first result per index (LoadGen may log one twice)."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    results: dict[int, list[int]] = {}
    for entry in entries:
        index = int(entry["qsl_idx"])
        if index not in results:
            results[index] = np.frombuffer(bytes.fromhex(entry["data"]), np.dtype(dtype)).tolist()
    return results


def score(results: dict[int, list[int]], references: list[str], tokenizer) -> dict:
    """The ROUGE figures, gen_len and gen_num of `results` (raises ImportError without rouge.py)."""
    from fine_tuning.abstractive_summarization.rouge import score_summaries
    indices = sorted(results)
    if indices and indices[-1] >= len(references):
        raise ValueError(f"the log holds sample index {indices[-1]} but the dataset has {len(references)} samples")
    predictions = [tokenizer.decode([t for t in results[i] if t != tokenizer.eos_id], skip_unknown=True)
                   for i in indices]
    return score_summaries(predictions, [references[i] for i in indices])


def report(scores: dict | None, sample_count: int) -> list[str]:
    """Lines comparing the scores with MLPerf's targets (None: ROUGE unavailable)."""
    if scores is None:
        return [ROUGE_MISSING, f"samples scored: 0 of {sample_count} in the log"]
    lines = []
    for key, reference in REFERENCE.items():
        target = 0.99 * reference
        verdict = "meets" if scores[key] >= target else "below"
        lines.append(f"{NAMES[key]:10s} {scores[key]:8.4f}   target >= {target:.4f} (99% of {reference}): {verdict}")
    lines.append(f"{NAMES['rougeLsum']:10s} {scores['rougeLsum']:8.4f}   (no target)")
    full = 13368
    target_len = 0.9 * REFERENCE_GEN_LEN
    verdict = "meets" if scores["gen_len"] >= target_len else "below"
    lines.append(f"gen_len    {scores['gen_len']:8d}   target >= {target_len:.0f} (90% of {REFERENCE_GEN_LEN}, "
                 f"all {full} samples): {verdict}; per sample {scores['gen_len'] / max(scores['gen_num'], 1):.1f} "
                 f"chars vs the target's {target_len / full:.1f}")
    lines.append(f"gen_num    {scores['gen_num']:8d}   (of {full} in the full set)")
    return lines


def evaluate(log_dir: str, dataset: str, tokenizer, dtype: str = "int32") -> list[str]:
    from bench.mlperf.dataset import load_samples
    path = os.path.join(log_dir, "mlperf_log_accuracy.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the harness with --mode accuracy first")
    results = read_accuracy_log(path, dtype)
    references = [s.reference for s in load_samples(dataset)]
    try:
        scores = score(results, references, tokenizer)
    except ImportError as err:
        if "rouge" not in str(err):
            raise
        scores = None
    return report(scores, len(results))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.mlperf.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", required=True, help="the LoadGen output directory of an accuracy run")
    parser.add_argument("--dataset", required=True, help="cnn_eval.json (the references)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory/file or hub id (GPT-J's)")
    parser.add_argument("--dtype", choices=("int32", "int64"), default="int32",
                        help="token id width in the log (this harness writes int32)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    from input.tokenizer import load_tokenizer
    try:
        lines = evaluate(args.log_dir, args.dataset, load_tokenizer(args.tokenizer), args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
