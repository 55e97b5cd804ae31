"""The embedded default run (`make demo`): the whole pipeline on this machine, no network.

1. corpus      Python's own standard-library sources as Pile-format jsonl.zst
2. tokenizer   a GPT-2-style byte-level BPE trained on that corpus
3. records     packed TFRecords (train/val) by the Pile preprocessing script
4. train       a small GPT-J (configs/params_gptj_demo.yaml) with the estimator
5. evaluate    perplexity before and after training
6. sample      a greedy continuation of a prompt

Each stage reuses what an earlier run built (work dir `demo_work/`); training resumes from its
last checkpoint, so an interrupted demo picks up where it stopped.
"""
from __future__ import annotations

import glob
import os
import sys
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PARAMS = os.path.join(ROOT, "configs", "params_gptj_demo.yaml")
PROMPT = "def read_file(path):\n"


def stage(title: str) -> None:
    from runtime.logging_utils import log
    log(f"== {title}")


def build_corpus(work: str, max_mb: float) -> list[str]:
    from input.scripts.make_local_corpus import make_local_corpus
    corpus = os.path.join(work, "corpus")
    files = sorted(glob.glob(os.path.join(corpus, "*.jsonl.zst")))
    if not files:
        info = make_local_corpus(corpus, max_mb=max_mb)
        files = sorted(glob.glob(os.path.join(corpus, "*.jsonl.zst")))
        stage(f"corpus: {info['documents']:,} documents, {info['text_bytes'] / 2**20:.1f} MiB of text")
    else:
        stage(f"corpus: reusing {len(files)} file(s) in {corpus}")
    return files


def build_tokenizer(work: str, corpus: list[str], vocab_size: int):
    from input.readers import read_documents
    from input.scripts.train_tokenizer import train_tokenizer
    from input.tokenizer import load_tokenizer
    directory = os.path.join(work, "tokenizer")
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        stage(f"tokenizer: reusing {directory}")
        return load_tokenizer(directory)
    start = time.time()
    tokenizer = train_tokenizer((d.text for d in read_documents(corpus)), directory, vocab_size=vocab_size)
    stage(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, trained in {time.time() - start:.0f}s")
    return tokenizer


def build_records(work: str, corpus: list[str], tokenizer, sequence_length: int) -> str:
    from input.scripts.pile.preprocess import preprocess
    output = os.path.join(work, "tfrecords")
    stats = preprocess(corpus, output, tokenizer, max_sequence_length=sequence_length, shard_size=4096,
                       val_fraction=0.03, seed=0, workers=2, progress=True)
    for split, info in stats.items():
        stage(f"records/{split}: {info['examples']:,} examples, {info['tokens']:,} tokens")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "demo_work"),
                        help="corpus, tokenizer, records and the model go here; a rerun reuses them")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params YAML of the demo model")
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="text gathered for the corpus, in MB")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens of the greedy continuation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, e.g. --set runconfig.max_steps=50 (repeatable)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)

    from generation.greedy import greedy_generate
    from runtime.estimator import Estimator
    from config.params import load_params

    started = time.time()
    work = os.path.abspath(args.work_dir)
    params = load_params(args.params, args.overrides + [
        f"train_input.data_dir={os.path.join(work, 'tfrecords', 'train')}",
        f"eval_input.data_dir={os.path.join(work, 'tfrecords', 'val')}"])
    corpus = build_corpus(work, args.corpus_mb)
    tokenizer = build_tokenizer(work, corpus, params.model.vocab_size)
    tokenizer.check_fits_model(params.model.vocab_size)
    build_records(work, corpus, tokenizer, params.train_input.max_sequence_length)

    model_dir = os.path.join(work, "model")
    estimator = Estimator(params, model_dir)
    if estimator.restore() == 0:
        stage("evaluate the untrained model")
        estimator.evaluate(restore=False)
    stage(f"train to step {params.runconfig.max_steps}")
    estimator.train()
    stage("evaluate the trained model")
    trained = estimator.evaluate(restore=False)
    untrained = next(h for h in estimator_history(model_dir) if h["step"] == 0)
    stage(f"perplexity: untrained {untrained['perplexity']:.1f} -> trained {trained['perplexity']:.1f} "
          f"(loss {untrained['loss']:.3f} -> {trained['loss']:.3f})")

    stage("greedy continuation")
    prompt_ids = tokenizer.encode(PROMPT)
    new_ids, _ = greedy_generate(estimator.model, prompt_ids, args.max_new_tokens, stop_id=tokenizer.eos_id)
    print("-" * 60)
    print(PROMPT + tokenizer.decode(new_ids, skip_unknown=True))
    print("-" * 60)
    stage(f"demo finished in {time.time() - started:.0f}s; TensorBoard: tensorboard --logdir {model_dir}")
    if trained["perplexity"] >= untrained["perplexity"] * 0.5:
        print("warning: training did not halve the perplexity; see the log above", file=sys.stderr)
        return 1
    return 0


def estimator_history(model_dir: str) -> list[dict]:
    import json
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as f:
        return json.load(f)["history"]


if __name__ == "__main__":
    sys.exit(main())
