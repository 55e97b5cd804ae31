"""Greedy decoding with the model's key/value cache: the prompt runs once (prefill), then one
compiled step per new token. The full strategy set (sampling, beam search, batching with left
padding) builds on this in the generation package."""
from __future__ import annotations

import json
import os

import tensorflow as tf

from model import GPTJModel
from runtime.files import atomic_write_text


def greedy_generate(model: GPTJModel, prompt_ids: list[int], max_new_tokens: int,
                    stop_id: int | None = None) -> tuple[list[int], str]:
    """(new token ids, finish reason "stop" | "length") continuing `prompt_ids` greedily."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_position_embeddings={limit}; shorten the prompt or ask for fewer tokens")
    length = len(prompt_ids) + max_new_tokens
    slots = tf.range(length)

    @tf.function(reduce_retracing=True)
    def step(tokens, cache, index):
        # tokens [1, s] written at cache slots [index, index + s); valid keys are slots < index + s.
        valid = tf.cast(slots < index + tf.shape(tokens)[1], tf.int32)[None, :]   # [1, L]
        out = model(tokens, attention_mask=valid, cache=cache, cache_index=index)
        return tf.argmax(out.logits[:, -1], axis=-1, output_type=tf.int32), out.cache

    cache = model.empty_cache(1, length)
    token, cache = step(tf.constant([prompt_ids], tf.int32), cache, tf.constant(0))
    new_ids, index = [], len(prompt_ids)
    while True:
        new_ids.append(int(token[0]))
        if stop_id is not None and new_ids[-1] == stop_id:
            return new_ids, "stop"
        if len(new_ids) == max_new_tokens:
            return new_ids, "length"
        token, cache = step(token[:, None], cache, tf.constant(index))
        index += 1


def complete_prompt(model: GPTJModel, tokenizer_source: str, prompt: str, max_new_tokens: int,
                    output_path: str | None = None) -> str:
    """Greedy continuation of `prompt` as text; also appended as a JSON line to `output_path`."""
    from input.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_source)
    tokenizer.check_fits_model(model.config.vocab_size)
    prompt_ids = tokenizer.encode(prompt)
    new_ids, reason = greedy_generate(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eos_id)
    completion = tokenizer.decode(new_ids, skip_unknown=True)
    if output_path:
        previous = open(output_path, encoding="utf-8").read() if os.path.exists(output_path) else ""
        record = {"prompt": prompt, "completion": completion, "token_ids": new_ids, "finish_reason": reason}
        atomic_write_text(output_path, previous + json.dumps(record) + "\n")
    return completion
