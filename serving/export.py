"""Export a model as a TensorFlow SavedModel whose `serving_default` generates tokens.

    python -m serving.export --params P (--model-dir M | --checkpoint-path C | --hf-checkpoint HF) \\
        --output-dir OUT [--dtype bfloat16] [--weight-format int8]
        [--num-beams 4 --beam-prompt-length 128 --beam-max-new-tokens 64]

What is a tensor and what is fixed when the graph is traced (a SavedModel keeps traced graphs):
- serving_default: greedy decoding and sampling. Batch size, prompt length and max_new_tokens
  are dynamic; every decoding setting is an input tensor (greedy vs sampling is a bool), so one
  graph serves every greedy/sampling request. The loop is the slot decoder's step
  (serving/slots.py) in a tf.while_loop, the same math the HTTP server runs.
- beam_search (only with --num-beams > 1): beam search has static shapes (beams x candidates),
  so beam count, the prompt length bucket and max_new_tokens are fixed at export; one prompt
  per call. See docs/serving.md for both signatures.
With --weight-format bfloat16 or int8 the SavedModel holds the packed kernels (the float32
model is never built: generation/loading.py), so it is 2 or 4 times smaller.
"""
from __future__ import annotations

import argparse
import os
import sys

from config.cli import ArgumentParser
from config.quiet import add_verbose_flag, quiet_tensorflow
from generation.flags import add_weight_format_flag, add_weight_source_flags
from runtime import preflight
from serving.loading import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m serving.export", description=__doc__.split("\n\n")[0])
    add_weight_source_flags(parser, "exported")
    parser.add_argument("--output-dir", required=True, help="where the SavedModel is written (a new directory)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the params')")
    add_weight_format_flag(parser)
    parser.add_argument("--num-beams", type=int, default=1, help="also export a beam_search signature "
                                                                 "with this many beams (1: none)")
    parser.add_argument("--beam-prompt-length", type=int, default=128, help="longest prompt beam_search takes")
    parser.add_argument("--beam-max-new-tokens", type=int, default=64, help="beam_search's max_new_tokens")
    parser.add_argument("--beam-stop-id", type=int, action="append", default=[],
                        help="stop token id of beam_search (repeatable), e.g. the tokenizer's EOS id")
    preflight.add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


if __name__ == "__main__":      # --help and argument errors exit here, before the imports below load TensorFlow
    quiet_tensorflow(build_parser().parse_args().verbose)

import numpy as np
import tensorflow as tf

from generation.batch import round_up
from generation.beam_search import BeamDecoder
from generation.config import GenerationConfig
from generation.batch import PromptBatch
from generation.weights import GenerationModel
from model import GPTJModel
from runtime.peak_memory import Decoding, generation_estimate
from serving.loading import load_serving_model
from serving.slots import RowSettings, no_bad_words, prefill_rows, step_rows

PAD_OUTPUT = 0     # fills output_ids past a row's length (the lengths output says where that starts)

GENERATE_SIGNATURE = {
    "token_ids": tf.TensorSpec([None, None], tf.int32),       # [b, P] prompts, right-padded
    "lengths": tf.TensorSpec([None], tf.int32),               # [b] prompt lengths (>= 1)
    "max_new_tokens": tf.TensorSpec([], tf.int32),
    "do_sample": tf.TensorSpec([], tf.bool),
    "temperature": tf.TensorSpec([], tf.float32),
    "top_k": tf.TensorSpec([], tf.int32),
    "top_p": tf.TensorSpec([], tf.float32),
    "repetition_penalty": tf.TensorSpec([], tf.float32),
    "min_new_tokens": tf.TensorSpec([], tf.int32),
    "seeds": tf.TensorSpec([None], tf.int64),                 # [b] one sampling seed per prompt
    "stop_ids": tf.TensorSpec([None], tf.int32),              # [n] stop token ids (may be empty)
}


def left_aligned(token_ids: tf.Tensor, lengths: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Right-padded [b, P] -> (left-padded [b, P] as generation/batch.py lays prompts out, first_slot [b])."""
    prompt_slots = tf.shape(token_ids)[1]
    first_slot = prompt_slots - lengths
    source = tf.range(prompt_slots)[None, :] - first_slot[:, None]                       # [b, P]
    moved = tf.gather(token_ids, tf.maximum(source, 0), batch_dims=1)
    return tf.where(source >= 0, moved, 0), first_slot


def generate_tokens(model: GPTJModel, token_ids, lengths, max_new_tokens, do_sample, temperature, top_k, top_p,
                    repetition_penalty, min_new_tokens, seeds, stop_ids) -> dict:
    """The serving_default computation -> {"output_ids": [b, max_new_tokens], "lengths": [b]}."""
    batch = tf.shape(token_ids)[0]
    tokens, first_slot = left_aligned(token_ids, lengths)
    prompt_slots = tf.shape(tokens)[1]

    def per_row(value):
        return tf.fill([batch], value)

    settings = RowSettings(per_row(do_sample), per_row(temperature), per_row(top_k), per_row(top_p),
                           per_row(repetition_penalty), per_row(min_new_tokens),
                           tf.tile(stop_ids[None, :], [batch, 1]), seeds, tf.zeros([batch], tf.int64),
                           *no_bad_words(batch))

    def stopped(chosen):
        return tf.reduce_any(chosen[:, None] == stop_ids[None, :], axis=-1)

    state, chosen = prefill_rows(model, tokens, first_slot, prompt_slots + max_new_tokens, settings)
    finished = stopped(chosen) | (max_new_tokens <= 1)
    out_lengths = tf.ones([batch], tf.int32)

    def running(step, state, finished, out_lengths):
        return tf.logical_and(step < max_new_tokens, tf.logical_not(tf.reduce_all(finished)))

    def advance(step, state, finished, out_lengths):
        state, chosen = step_rows(model, state, settings)
        out_lengths = tf.where(finished, out_lengths, step + 1)
        finished = finished | stopped(chosen) | (step + 1 >= max_new_tokens)
        return step + 1, state, finished, out_lengths

    _, state, _, out_lengths = tf.while_loop(running, advance, (tf.constant(1), state, finished, out_lengths))
    new = state.tokens[:, prompt_slots:prompt_slots + max_new_tokens]                     # [b, max_new]
    keep = tf.range(max_new_tokens)[None, :] < out_lengths[:, None]
    return {"output_ids": tf.where(keep, new, PAD_OUTPUT), "lengths": out_lengths}


class ServingModule(tf.Module):
    def __init__(self, model: GPTJModel | GenerationModel, beam: BeamDecoder | None = None):
        super().__init__()
        self.model = model
        if isinstance(model, GenerationModel):       # a plain object: its weight tree is tracked here
            self.weights = model.weights
        # Named specs: the signature's input names are these, as TF Serving's REST API shows them.
        named = [tf.TensorSpec(spec.shape, spec.dtype, name=name) for name, spec in GENERATE_SIGNATURE.items()]
        self.generate = tf.function(self._generate, input_signature=named)
        self.beam = beam
        if beam is not None:
            self.beam_search = tf.function(self._beam_search, input_signature=[
                tf.TensorSpec([1, None], tf.int32, name="token_ids"), tf.TensorSpec([], tf.int32, name="length")])

    def _generate(self, token_ids, lengths, max_new_tokens, do_sample, temperature, top_k, top_p,
                  repetition_penalty, min_new_tokens, seeds, stop_ids) -> dict:
        return generate_tokens(self.model, token_ids, lengths, max_new_tokens, do_sample, temperature, top_k,
                               top_p, repetition_penalty, min_new_tokens, seeds, stop_ids)

    def _beam_search(self, token_ids, length) -> dict:
        """One prompt (right-padded [1, <= beam prompt length]) -> its best beam's new tokens."""
        inputs = {"token_ids": token_ids, "length": length}
        decoder = self.beam
        pad = decoder.prompt_slots - tf.shape(inputs["token_ids"])[1]
        padded = tf.pad(inputs["token_ids"], [[0, 0], [0, pad]])
        padded = tf.ensure_shape(padded, [1, decoder.prompt_slots])
        tokens, first_slot = left_aligned(padded, inputs["length"][None])
        state = decoder.initial_state(PromptBatch(np.zeros([1, decoder.prompt_slots], np.int32),
                                                  np.zeros([1], np.int32)), np.zeros([1], np.int64))
        k = decoder.config.num_beams
        state = state._replace(tokens=tf.concat([tf.tile(tokens[:, None, :], [1, k, 1]),
                                                 state.tokens[:, :, decoder.prompt_slots:]], axis=2),
                               first_slot=first_slot)
        state = decoder._prefill(state)
        state = decoder._advance(state, tf.constant(decoder.config.max_new_tokens))
        start = decoder.prompt_slots
        length = state.done_lengths[0, 0]
        ids = state.done_tokens[0, 0, start:start + decoder.config.max_new_tokens]
        keep = tf.range(decoder.config.max_new_tokens) < length
        return {"output_ids": tf.where(keep, ids, PAD_OUTPUT)[None], "lengths": length[None],
                "scores": state.done_scores[0, :1]}


def export(model: GPTJModel | GenerationModel, output_dir: str, beam_config: GenerationConfig | None = None,
           beam_prompt_length: int = 128) -> str:
    """Write the SavedModel; with beam_config (num_beams > 1) also the beam_search signature."""
    beam = None
    if beam_config is not None and beam_config.num_beams > 1:
        prompt_slots = round_up(beam_prompt_length, 32)
        beam = BeamDecoder(model, beam_config, 1, prompt_slots,
                           round_up(prompt_slots + beam_config.max_new_tokens, 32), "eager")
    module = ServingModule(model, beam)
    signatures = {"serving_default": module.generate.get_concrete_function()}
    if beam is not None:
        signatures["beam_search"] = module.beam_search.get_concrete_function()
    tf.saved_model.save(module, output_dir, signatures=signatures)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from config.params import ParamsError
    try:
        if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
            raise ValueError(f"--output-dir {args.output_dir} is not empty; pass a new directory")

        def check_memory(params):      # the weights in their format, traced; nothing decodes here
            estimate = generation_estimate("serving.export", params.model, args.weight_format,
                                           lambda count: Decoding(0, 0, 0, 0), loader="direct", format_flag=None)
            preflight.check(estimate, args.skip_memory_check)
        params, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                           args.weight_format, args.hf_checkpoint, check=check_memory)
        beam = None
        if args.num_beams > 1:
            stops = tuple(args.beam_stop_id)
            beam = GenerationConfig(num_beams=args.num_beams, max_new_tokens=args.beam_max_new_tokens,
                                    stop_token_ids=stops, pad_token_id=stops[0] if stops else 0)
        export(model, args.output_dir, beam, args.beam_prompt_length)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"SavedModel written to {args.output_dir} (signatures: serving_default"
          f"{', beam_search' if args.num_beams > 1 else ''}; see docs/serving.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
