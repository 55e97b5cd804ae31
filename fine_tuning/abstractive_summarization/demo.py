"""Summarization fine-tuning end to end, offline, on 2 CPU cores:

    python -m fine_tuning.abstractive_summarization.demo

1. base model  the small GPT-J of `make demo` (demo_work/model; built by demo.py when missing),
               pretrained on the standard library's sources
2. data        every standard-library function with a one-sentence docstring: the body is
               the article, the docstring's first sentence the summary (stdlib_functions.py).
               The held-out test set comes only from files the base model never trained on
               (not in its corpus, or in its validation split), so neither pretraining nor
               fine-tuning saw a test function
3. records     prepare.py's records (one function per record, loss on the summary only)
4. before      ROUGE of the base model on the test set (evaluate.py)
5. fine-tune   the estimator, warm-started from the base model
               (configs/params_gptj_demo_summarization.yaml)
6. after       ROUGE of the fine-tuned model on the same test set, and a few examples
7. --lora      also fine-tune low-rank adapters on the frozen base (LORA_SETTINGS below) and
               score them on the same test set, beside full fine-tuning

The separator: the demo tokenizer fills all 4096 rows of the base model, so there is no
slot after its vocabulary. The demo uses the byte token 0xC0 instead, which no UTF-8 text
contains (layout.unreachable_byte_token_ids): the base model never read or predicted it, so
its embedding row is as free as a new row would be, and the model keeps its shape (no
embedding surgery, the warm start loads every weight).

Decoding: beam search with 4 beams and early stopping as MLPerf, but 1 to 32 new tokens, since
a docstring's first sentence is ~10 tokens (MLPerf's 30-token minimum is for news highlights).
Every stage reuses what an earlier run built under demo_work/summarization/.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

from config.cli import ArgumentParser
from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "params_gptj_demo_summarization.yaml")
BASE_VAL_FRACTION, BASE_SEED = 0.03, 0     # demo.py's split of the base model's corpus
MAX_INPUT_TOKENS, MAX_NEW_TOKENS = 96, 32
# --lora: adapters of rank 16 on every projection (PEFT's "all linear" recipe; the demo model is small,
# so attention alone leaves it little to adapt), and the 4x higher learning rate LoRA takes
# (its updates are low-rank and start from zero); the schedule's shape is full fine-tuning's.
LORA_SETTINGS = ["model.lora={rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, out_proj, fc_in, fc_out]}",
                 "optimizer.learning_rate=[{scheduler: Linear, initial_learning_rate: 0.0, end_learning_rate: 2.0e-3, "
                 "steps: 10}, {scheduler: Cosine, initial_learning_rate: 2.0e-3, alpha: 0.1, decay_steps: 190}]"]


def stage(message: str) -> None:
    from runtime.logging_utils import log
    log(f"== {message}")


def base_model(work: str) -> str:
    """demo_work/model, trained by demo.py when it holds no checkpoint yet."""
    import tensorflow as tf
    model_dir = os.path.join(work, "model")
    if tf.train.latest_checkpoint(model_dir) is None or not os.path.isfile(os.path.join(model_dir, "eval_results.json")):
        stage(f"no base model in {model_dir}: training it with demo.py (several minutes)")
        import demo as base_demo
        base_demo.main(["--work-dir", work])
    return model_dir


def pretraining_train_texts(work: str) -> set[int]:
    """Hashes of the corpus documents demo.py trained the base model on (its train split)."""
    import glob

    from input.readers import read_documents
    from input.scripts.pile.preprocess import in_val_split
    corpus = sorted(glob.glob(os.path.join(work, "corpus", "*.jsonl.zst")))
    return {hash(d.text) for d in read_documents(corpus) if not in_val_split(d.text, BASE_VAL_FRACTION, BASE_SEED)}


def build_dataset(work: str, data_dir: str, test_size: int, train_size: int) -> dict:
    """train.jsonl and test.jsonl of stdlib functions; test functions come from files the base model did not train on."""
    from fine_tuning.abstractive_summarization.stdlib_functions import examples_of_files, stdlib_python_files
    info_path = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            return json.load(f)
    seen = pretraining_train_texts(work)
    held_out, trained = [], []
    for text, example in examples_of_files(stdlib_python_files()):
        (trained if hash(text) in seen else held_out).append(example)
    random.Random(0).shuffle(held_out)
    random.Random(1).shuffle(trained)
    test = held_out[:test_size]
    train = (trained + held_out[test_size:])[:train_size]
    os.makedirs(data_dir, exist_ok=True)
    from config.files import atomic_write_text
    for name, examples in (("train", train), ("test", test)):
        atomic_write_text(os.path.join(data_dir, f"{name}.jsonl"), "".join(
            json.dumps({"id": e.id, "article": e.article, "highlights": e.summary}) + "\n" for e in examples))
    info = {"train": len(train), "test": len(test), "functions_in_unseen_files": len(held_out),
            "functions_in_pretraining_files": len(trained)}
    atomic_write_text(info_path, json.dumps(info, indent=1))
    return info


def rouge_of(model, tokenizer, articles, config, output_dir: str, batch_size: int) -> dict:
    from fine_tuning.abstractive_summarization.evaluate import evaluate
    return evaluate(model, tokenizer, articles, config, output_dir, batch_size=batch_size,
                    settings={"max_input_tokens": MAX_INPUT_TOKENS, "num_beams": config.num_beams,
                              "max_new_tokens": config.max_new_tokens}, progress=True,
                    length_multiple=MAX_INPUT_TOKENS)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "demo_work"),
                        help="the make demo work dir: its model is the base; summarization data and runs go under it")
    parser.add_argument("--params", default=CONFIG, help="params YAML of the fine-tuning run")
    parser.add_argument("--test-size", type=int, default=64, help="held-out functions scored before and after")
    parser.add_argument("--train-size", type=int, default=4000, help="functions written as training records")
    parser.add_argument("--batch-size", type=int, default=16, help="articles per generation batch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key (repeatable)")
    parser.add_argument("--lora", action="store_true",
                        help="also fine-tune LoRA adapters on the frozen base and report their ROUGE beside full "
                             "fine-tuning's (demo_work/summarization/lora)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)

    from checkpoint_utils.load import load_model
    from config.params import load_params
    from fine_tuning.abstractive_summarization.evaluate import load_eval_articles, mlperf_generation_config
    from fine_tuning.abstractive_summarization.layout import unreachable_byte_token_ids
    from fine_tuning.abstractive_summarization.prepare import prepare
    from input.tokenizer import load_tokenizer
    from runtime.estimator import Estimator

    started = time.time()
    timings = {}
    work = os.path.abspath(args.work_dir)
    summ = os.path.join(work, "summarization")
    records = os.path.join(summ, "records")
    model_dir = os.path.join(summ, "model")
    lora_dir = os.path.join(summ, "lora")
    placed = [f"train_input.data_dir={os.path.join(records, 'train')}", f"eval_input.data_dir={os.path.join(records, 'test')}",
              f"runconfig.checkpoint_path={os.path.join(work, 'model')}"]
    params = load_params(args.params, args.overrides + placed + [f"runconfig.model_dir={model_dir}"])
    lora_params = load_params(args.params, LORA_SETTINGS + args.overrides + placed + [f"runconfig.model_dir={lora_dir}"])

    base = base_model(work)
    timings["base model"] = time.time() - started
    tokenizer = load_tokenizer(os.path.join(work, "tokenizer"))
    sep_id = unreachable_byte_token_ids(tokenizer)[0]

    mark = time.time()
    info = build_dataset(work, os.path.join(summ, "data"), args.test_size, args.train_size)
    stage(f"data: {info['train']} training functions, {info['test']} held-out test functions (from "
          f"{info['functions_in_unseen_files']} functions in files the base model never trained on)")
    seq_len = params.train_input.max_sequence_length
    for split in ("train", "test"):
        stats = prepare([os.path.join(summ, "data", f"{split}.jsonl")], records, tokenizer, max_sequence_length=seq_len,
                        truncate_article=True, sep_id=sep_id, model_vocab_size=params.model.vocab_size, split=split,
                        shard_size=2048, workers=0, progress=False)
        stage(f"records/{split}: {stats['examples']} examples, {stats['truncated_articles']} articles cut to fit "
              f"{seq_len} tokens, skipped {sum(stats['skipped'].values())}; separator id {sep_id} "
              f"(byte token {tokenizer.id_to_token(sep_id)!r})")
    timings["data + records"] = time.time() - mark

    articles = load_eval_articles([os.path.join(summ, "data", "test.jsonl")], tokenizer, sep_id=sep_id,
                                  max_input_tokens=MAX_INPUT_TOKENS)
    config = mlperf_generation_config(tokenizer.eos_id, num_beams=4, min_new_tokens=1, max_new_tokens=MAX_NEW_TOKENS)

    mark = time.time()
    stage("ROUGE of the base model on the held-out functions (before fine-tuning)")
    before = rouge_of(load_model(params.model, base), tokenizer, articles, config, os.path.join(summ, "eval_before"),
                      args.batch_size)
    timings["evaluate before"] = time.time() - mark

    def fine_tune_and_score(name: str, run_params, run_dir: str, what: str, scored: str) -> dict:
        """Train run_params in run_dir, then ROUGE of the result on the held-out functions."""
        mark = time.time()
        stage(f"{what} to step {run_params.runconfig.max_steps} from {base}")
        Estimator(run_params, run_dir).train()
        timings[f"{name} fine-tune"] = time.time() - mark
        mark = time.time()
        stage(f"ROUGE of {scored} on the same functions")
        result = rouge_of(load_model(run_params.model, run_dir), tokenizer, articles, config,
                          os.path.join(summ, f"eval_{name}"), args.batch_size)
        timings[f"evaluate {name}"] = time.time() - mark
        return result

    results = [("before", before), ("after", fine_tune_and_score("after", params, model_dir, "fine-tune, warm-started",
                                                              "the fine-tuned model (after)"))]
    if args.lora:
        results.append(("LoRA", fine_tune_and_score("lora", lora_params, lora_dir,
                                                    "LoRA: adapters on the frozen base, fine-tuned",
                                                    "the LoRA run (its adapters merged into the base at load)")))
    with open(os.path.join(summ, "eval_after", "predictions.jsonl"), encoding="utf-8") as f:
        shown = [json.loads(line) for line in f][:3]
    for record in shown:
        print("-" * 60)
        print(f"{record['id']}\n  reference:  {record['reference']}\n  prediction: {record['prediction']}")
    print("-" * 60)
    print(f"{'':10s} {'ROUGE-1':>8s} {'ROUGE-2':>8s} {'ROUGE-L':>8s} {'ROUGE-Lsum':>10s} {'gen_len':>8s}")
    for name, result in results:
        print(f"{name:10s} {result['rouge1']:8.2f} {result['rouge2']:8.2f} {result['rougeL']:8.2f} "
              f"{result['rougeLsum']:10.2f} {result['gen_len']:8d}")
    stage("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.time() - started:.0f}s")
    failed = [name for name, result in results[1:] if result["rougeL"] < before["rougeL"] + 5.0]
    if failed:
        print(f"warning: {' and '.join(failed)} did not raise ROUGE-L by 5 points; see the log above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
