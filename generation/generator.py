"""Generator: the entry point for token-level generation with one model.

    generator = Generator(model)
    results = generator.generate([[12, 7, 99], [5]], GenerationConfig(max_new_tokens=16))

It validates the request, left-pads the prompts, picks the decoder for the strategy
(greedy/sampling or beam search) and runs the host loop. Compiled decoders are kept per
(config, batch size, prompt slots, cache length), so repeated calls with similar shapes reuse
them: prompt slots and cache lengths are rounded up to `length_multiple` for that reason
(left padding does not change the result).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from generation.batch import left_pad, round_up
from generation.beam_search import BeamDecoder
from generation.config import GenerationConfig, GenerationConfigError
from generation.decode import TokenDecoder
from generation.results import Generation
from model import GPTJModel

# rows' new tokens so far -> {row: stop string} for rows whose text now holds a stop string
StopChecker = Callable[[list[list[int]]], dict[int, str]]
# rows' new tokens so far, after every synced step
TokensCallback = Callable[[list[list[int]]], None]


class Generator:
    def __init__(self, model: GPTJModel, compile_mode: str = "xla", length_multiple: int = 32,
                 place_state: Callable | None = None):
        """compile_mode: "xla" (default: fastest decode on CPU, see docs/generation.md), "graph"
        or "eager". place_state(state) -> state: applied to each decoder state the host builds
        before a compiled step reads it (runtime.mesh.replicate_state puts it on a device mesh)."""
        self.model = model
        self.compile_mode = compile_mode
        self.length_multiple = length_multiple
        self.place_state = place_state or (lambda state: state)
        self._decoders: dict[tuple, TokenDecoder | BeamDecoder] = {}

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 seeds: Sequence[int] | None = None, on_tokens: TokensCallback | None = None,
                 stop_checker: StopChecker | None = None) -> list[Generation]:
        """Continue every prompt (token ids) under `config`: config.num_return_sequences
        Generations per prompt, prompts in order (prompt i's at [i * n, (i + 1) * n)).

        seeds: one sampling seed per prompt (default: config.seed for all); a prompt's n samples
            use streams 0..n-1 of its seed, so each is reproducible on its own.
        on_tokens: called with every row's new tokens after each step (streaming; greedy and
            sampling only), which syncs the host once per token.
        stop_checker: ends rows whose text holds a stop string (see generation/text.py).
        """
        model_config = self.model.config
        config.check_against_model(model_config.vocab_size)
        config.check_prompts(prompts, model_config.max_position_embeddings, model_config.vocab_size)
        if config.stop_strings and stop_checker is None:
            raise GenerationConfigError("stop strings need a tokenizer to read the text; use "
                                        "generation.text.complete, or give stop token ids instead")
        if on_tokens is not None and config.num_beams > 1:
            raise GenerationConfigError("streaming shows one sequence as it grows; beam search only knows "
                                        "its answer at the end: stream with greedy decoding or sampling")
        seeds = np.full([len(prompts)], config.seed, np.int64) if seeds is None else np.asarray(seeds, np.int64)
        if seeds.shape != (len(prompts),):
            raise GenerationConfigError(f"got {seeds.size} seeds for {len(prompts)} prompts; give one per prompt")
        # Samples are independent rows; beam search keeps its n best hypotheses per prompt instead.
        copies = config.num_return_sequences if config.strategy == "sample" else 1
        rows = [prompt for prompt in prompts for _ in range(copies)]
        streams = np.tile(np.arange(copies, dtype=np.int64), len(prompts))
        batch = left_pad(rows, config.pad_token_id, self.length_multiple)
        cache_length = round_up(batch.prompt_slots + config.max_new_tokens, self.length_multiple)
        decoder = self.decoder(config, len(rows), batch.prompt_slots, cache_length)
        state = decoder.prefill(self.place_state(decoder.initial_state(batch, np.repeat(seeds, copies), streams)))
        watch = on_tokens is not None or stop_checker is not None
        stopped_by_text: dict[int, str] = {}
        while True:
            if watch:
                rows = decoder.row_tokens(state)
                if on_tokens is not None:
                    on_tokens(rows)
                if stop_checker is not None:
                    newly = {r: s for r, s in stop_checker(rows).items() if r not in stopped_by_text}
                    if newly:
                        stopped_by_text.update(newly)
                        state = self.place_state(decoder.stop_rows(state, sorted(newly)))
            if decoder.is_done(state):
                break
            until = int(state.step) + 1 if watch else config.max_new_tokens
            state = decoder.advance(state, tf.constant(until))
        return decoder.results(state, stopped_by_text)

    def decoder(self, config: GenerationConfig, batch_size: int, prompt_slots: int,
                cache_length: int) -> TokenDecoder | BeamDecoder:
        """The compiled decoder for this shape, built on first use. The seed and stop strings
        are runtime inputs, so they do not key a new compilation."""
        key = (dataclasses.replace(config, seed=0, stop_strings=()), batch_size, prompt_slots, cache_length)
        if key not in self._decoders:
            kind = BeamDecoder if config.num_beams > 1 else TokenDecoder
            self._decoders[key] = kind(self.model, config, batch_size, prompt_slots, cache_length,
                                       self.compile_mode)
        return self._decoders[key]

