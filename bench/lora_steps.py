"""One side of bench.lora_real_size, run in its own process (its own peak RSS): LoRA training
steps on a repeated batch, ours (`ours`) or transformers + PEFT (`peft`), figures as JSON.

    python -m bench.lora_steps ours --source HF_DIR --sequence 512 --steps 4 --result OUT.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from config.cli import ArgumentParser
from config.files import atomic_write_text
from config.quiet import add_verbose_flag, quiet_tensorflow

BATCH_SEED = 1234


def batch_ids(vocab: int, length: int) -> np.ndarray:
    """The repeated batch: [1, length + 1] token ids (inputs and their next tokens), seeded."""
    return np.random.default_rng(BATCH_SEED).integers(0, min(vocab, 50257), size=(1, length + 1), dtype=np.int64)


def lora_settings(args):
    from config.lora import LoraParams
    return LoraParams(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")), base_dtype="bfloat16")


def ours(args) -> dict:
    import tensorflow as tf

    from checkpoint_utils.hf_config import params_from_hf_config
    from checkpoint_utils.hf_source import read_config
    from config.params import OptimizerParams, Params, RunConfig, TrainInputParams
    from runtime.estimator import Estimator
    from runtime.flops import measure_matmul_peak
    from runtime.model_flops import training_flops_per_token

    model = dataclasses.replace(params_from_hf_config(read_config(args.source)), lora=lora_settings(args),
                                mixed_precision=True, mixed_precision_dtype="bfloat16")
    run_dir = args.result + ".run"
    shutil.rmtree(run_dir, ignore_errors=True)
    params = Params(model=model,
                    train_input=TrainInputParams(data_dir="(in memory)", batch_size=1, max_sequence_length=args.sequence),
                    optimizer=OptimizerParams(learning_rate=args.learning_rate),
                    runconfig=RunConfig(checkpoint_path=args.source, max_steps=args.steps, log_steps=1,
                                        save_checkpoints_steps=10 ** 6, save_summary_steps=10 ** 6,
                                        recompute_activations=not args.no_recompute))
    ids = batch_ids(model.vocab_size, args.sequence)
    features = {"input_ids": tf.constant(ids[:, :-1], tf.int32), "input_mask": tf.ones([1, args.sequence], tf.int32)}
    labels = tf.constant(ids[:, 1:], tf.int32)

    def input_fn(params, mode, input_context=None, data_position=0):
        return tf.data.Dataset.from_tensors((features, labels)).repeat()

    start = time.time()
    estimator = Estimator(params, run_dir, input_fn=input_fn)
    load_seconds = time.time() - start
    stamps, losses = [time.perf_counter()], []

    def on_step(step, logs):
        stamps.append(time.perf_counter())
        losses.append(logs["loss"])

    estimator.train(on_step=on_step)
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = np.diff(stamps)
    flops = training_flops_per_token(model, args.sequence)
    peak = measure_matmul_peak("bfloat16")
    timed = steps[1:] if len(steps) > 1 else steps                        # the first step compiles
    seconds = float(np.mean(timed))
    return {"load_seconds": load_seconds, "step_seconds": steps.tolist(), "seconds_per_step": seconds,
            "tokens_per_second": args.sequence / seconds, "losses": losses, "flops_per_token": flops,
            "achieved_flops": flops * args.sequence / seconds, "matmul_peak_bfloat16": peak,
            "mfu": flops * args.sequence / seconds / peak,
            "trainable": int(sum(v.shape.num_elements() for v in estimator.model.trainable_variables))}


def peft(args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    model = transformers.GPTJForCausalLM.from_pretrained(args.source, torch_dtype=torch.bfloat16)
    if not args.no_recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=args.targets.split(","), task_type="CAUSAL_LM"))
    for parameter in model.parameters():            # the adapters in float32, as ours
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    load_seconds = time.time() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    ids = torch.from_numpy(batch_ids(model.config.vocab_size, args.sequence))
    model.train()
    stamps, losses = [time.perf_counter()], []
    for _ in range(args.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1].clone())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss))
        stamps.append(time.perf_counter())
    steps = np.diff(stamps)
    timed = steps[1:] if len(steps) > 1 else steps
    seconds = float(np.mean(timed))
    return {"load_seconds": load_seconds, "step_seconds": steps.tolist(), "seconds_per_step": seconds,
            "tokens_per_second": args.sequence / seconds, "losses": losses,
            "trainable": int(sum(p.numel() for p in trainable))}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.lora_steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=("ours", "peft"))
    parser.add_argument("--source", required=True, help="the Hugging Face checkpoint directory (the base)")
    parser.add_argument("--sequence", type=int, required=True, help="tokens per sequence (batch 1)")
    parser.add_argument("--steps", type=int, default=4, help="training steps on the repeated batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,out_proj")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--no-recompute", action="store_true", help="keep every block's activations")
    parser.add_argument("--result", required=True, help="JSON file for the figures")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    figures = ours(args) if args.side == "ours" else peft(args)
    atomic_write_text(args.result, json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
