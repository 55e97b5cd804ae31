"""Check a converted checkpoint against the Hugging Face model it came from.

    python -m checkpoint_utils.verify --source HF_DIR_OR_HUB_ID --converted OUT

Runs both models on the same token ids (random ones, and any given with --ids) and prints
the max absolute logit difference per case; exits 1 when any exceeds --tolerance. The default
tolerance is float32 rounding's bound for this model (checkpoint_utils/rounding.py): it grows
with depth, width, sequence length and the logits' size, so a faithful 6B conversion passes
where a fixed 1e-4 would fail it. Needs torch and transformers (the `dev` extra): they are the
reference, not a runtime dependency.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from checkpoint_utils.convert_hf import load_converted_params
from checkpoint_utils.hf_source import read_config, resolve_source
from checkpoint_utils.rounding import logits_atol, longest_sum
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser


def _hf_model(source: str):
    try:
        import torch
        import transformers
    except ImportError:
        raise RuntimeError("verify needs torch and transformers as the reference: "
                           "pip install -e '.[dev]'") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model.eval(), torch


def compare(source: str, converted: str, cases: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
    """({case: max |logits_ours - logits_hf|} over the HF vocabulary, max |logits_hf| over all cases)."""
    import tensorflow as tf

    from checkpoint_utils.load import load_model
    hf, torch = _hf_model(source)
    ours = load_model(load_converted_params(converted), converted)
    results, scale = {}, 0.0
    for name, ids in cases.items():
        with torch.no_grad():
            reference = hf(torch.tensor(ids)).logits.float().numpy()
        logits = ours(tf.constant(ids)).logits.numpy()[..., :reference.shape[-1]]
        results[name] = float(np.abs(logits - reference).max())
        scale = max(scale, float(np.abs(reference).max()))
    return results, scale


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m checkpoint_utils.verify", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True, help="the HF checkpoint (directory or hub id)")
    parser.add_argument("--converted", required=True, help="the directory convert_hf wrote")
    parser.add_argument("--ids", default=None, help="comma-separated token ids to also compare")
    parser.add_argument("--batch", type=int, default=2, help="rows of random token ids")
    parser.add_argument("--length", type=int, default=16, help="tokens per row of random ids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest max |logits difference| that passes (exit 1 above it); default: float32 "
                             "rounding's bound for this model's depth and width, the longest case and the "
                             "reference's largest |logit| (checkpoint_utils/rounding.py)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    if not os.path.isdir(args.converted):
        print(f"error: --converted {args.converted} is not a directory", file=sys.stderr)
        return 2
    model = load_converted_params(args.converted)
    vocab = model.vocab_size
    hf_vocab = read_config(resolve_source(args.source))["vocab_size"]
    rng = np.random.default_rng(args.seed)
    cases = {"random": rng.integers(0, min(vocab, hf_vocab), size=(args.batch, args.length))}
    if args.ids:
        try:
            cases["given"] = np.array([[int(t) for t in args.ids.split(",")]])
        except ValueError:
            print(f"error: --ids {args.ids!r} must be comma-separated integers", file=sys.stderr)
            return 2
        if cases["given"].max() >= hf_vocab or cases["given"].min() < 0:
            print(f"error: --ids must lie in [0, {hf_vocab})", file=sys.stderr)
            return 2
    try:
        results, scale = compare(args.source, args.converted, cases)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    worst = max(results.values())
    for name, diff in results.items():
        print(f"{name:>8}: max |logits diff| = {diff:.3e}")
    if args.tolerance is None:
        length = max(ids.shape[-1] for ids in cases.values())
        tolerance = logits_atol(model, length, scale)
        why = (f" (float32 rounding bound: {model.num_hidden_layers} blocks, sums of up to "
               f"{longest_sum(model, length)} terms, |logits| <= {scale:.3g})")
    else:
        tolerance, why = args.tolerance, " (--tolerance)"
    verdict = "OK" if worst <= tolerance else "FAILED"
    print(f"{verdict}: worst {worst:.3e} vs tolerance {tolerance:.1e}{why}")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
