"""The measured steps of bench.real_size, one per process (so each has its own peak RSS):

    python -m bench.real_size_steps bandwidth --gib 1 --result R.json
    python -m bench.real_size_steps ours --source DIR --format int8 --result R.json --logits L.npy [...]
    python -m bench.real_size_steps transformers --source HF_DIR --result R.json --logits L.npy [...]

Each writes its figures as one JSON object to --result (atomically) and, for the model steps,
the logits of the quality prompts to --logits; the parent compares and prints them. Prompts are
drawn from fixed seeds here, so every step sees the same token ids.
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from bench.convert import status_bytes
from config.cli import ArgumentParser
from config.files import atomic_write_text
from config.quiet import add_verbose_flag, quiet_tensorflow
from generation.config import WEIGHT_FORMATS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROMPT_SEED, QUALITY_SEED = 1, 2
TORCH_THREADS = 2


def prompt_ids(vocab: int, length: int) -> list[int]:
    """The timed prompt: `length` random token ids (the pad id 0 excluded)."""
    return np.random.default_rng(PROMPT_SEED).integers(1, vocab, size=length).tolist()


def quality_ids(vocab: int, count: int, length: int) -> np.ndarray:
    """[count, length] random token ids whose logits every side saves."""
    return np.random.default_rng(QUALITY_SEED).integers(1, vocab, size=(count, length))


def enough_memory(needed: int) -> tuple[bool, str]:
    """Whether `needed` more bytes fit in what the machine has available now (with 10% spare)."""
    import psutil
    available = psutil.virtual_memory().available
    return needed < 0.9 * available, f"needs ~{needed / 2**30:.1f} GiB more, {available / 2**30:.1f} GiB available"


class MemoryGuard:
    """Ends this process (exit 3), writing its figures so far and the phase it was in, when the
    machine's available memory falls below `floor` bytes: a clear failure of this step, where the
    kernel's OOM killer could pick any process (another job on a shared machine)."""

    def __init__(self, result: dict, result_file: str, floor: int = 1 << 30):
        self.result, self.result_file, self.floor = result, result_file, floor
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import psutil
        while True:
            available = psutil.virtual_memory().available
            if available < self.floor:
                self.result["stopped"] = (f"out of memory during {self.result.get('phase', 'start-up')}: "
                                          f"{available / 2**30:.1f} GiB left on the machine, this process "
                                          f"held {status_bytes('self', 'VmRSS') / 2**30:.1f} GiB")
                atomic_write_text(self.result_file, json.dumps(self.result))
                os._exit(3)
            time.sleep(0.05)


def memory_now() -> dict:
    """{"rss", "peak"}: this process' resident bytes now and at its peak so far (GB-sized steps
    record it after each phase, so a high peak can be traced to the phase that made it)."""
    return {"rss": status_bytes("self", "VmRSS"), "peak": status_bytes("self", "VmHWM")}


class Stopwatch:
    """Wall and process CPU seconds of a block: CPU / wall is how many cores it kept busy."""

    def __enter__(self) -> "Stopwatch":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# ---- machine -----------------------------------------------------------------------------

def step_bandwidth(args, result: dict) -> None:
    """Memory read bandwidth: NumPy sums over an array far larger than the caches, by one thread
    and by one thread per core (ufunc loops release the GIL), and a copy; best of 3 each."""
    n = int(args.gib * 2**30) // 4
    data = np.ones(n, np.float32)                                     # touched: every page resident
    target = np.empty_like(data)
    cores = len(os.sched_getaffinity(0))
    parts = np.array_split(data, cores)

    def best(run) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    def threaded_sum():
        threads = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    result.update({"bytes": data.nbytes, "cores": cores,
                   "read_1_thread": data.nbytes / best(lambda: np.sum(data)),
                   "read_all_cores": data.nbytes / best(threaded_sum),
                   "copy_1_thread": 2 * data.nbytes / best(lambda: np.copyto(target, data))})   # read + write


# ---- ours --------------------------------------------------------------------------------

def load_ours(source: str, weight_format: str):
    """The model in `weight_format`, loaded tensor by tensor (generation.loading) from a converted
    checkpoint directory or a Hugging Face directory."""
    from checkpoint_utils.convert_hf import load_converted_params
    from checkpoint_utils.hf_config import params_from_hf_config
    from checkpoint_utils.hf_source import read_config
    from generation.loading import load_generation_model
    converted = os.path.exists(os.path.join(source, "params.yaml"))
    params = load_converted_params(source) if converted else params_from_hf_config(read_config(source))
    return load_generation_model(params, source, weight_format)


def weights_of(model) -> dict:
    return model.weights if hasattr(model, "weights") and isinstance(model.weights, dict) else model.weights_tree()


def decode_step_bytes(model, batch: int, cache_length: int) -> tuple[int, int]:
    """(weight bytes, cache bytes) one decode step reads: every weight except the embedding table
    (one row of it per token), and the whole static-length key/value cache of every block."""
    from generation.weights import tree_bytes
    weights = weights_of(model)
    c = model.config
    keys, _ = model.empty_cache(1, 1)[0]
    cache = 2 * c.num_hidden_layers * batch * c.num_heads * cache_length * c.head_dim * keys.dtype.size
    return tree_bytes(weights) - tree_bytes({"embedding": weights["embedding"]}), cache


def cache_length(generator, prompt_length: int, config) -> int:
    """The key/value cache slots the generator's decoder gets for this prompt length and config."""
    from generation.batch import round_up
    multiple = generator.length_multiple
    return round_up(round_up(prompt_length, multiple) + config.max_new_tokens, multiple)


def time_decoding(generator, prompt: list[int], config, new_tokens: int, time_prefill: bool = True) -> dict:
    """The prefill (its first call compiles it, so with time_prefill it runs once more, timed), one
    advance step (compiles advance), then `new_tokens` timed steps, with the process' CPU time.
    Only this function holds the decoder states, so each is freed as soon as the next exists."""
    import tensorflow as tf

    from bench.generate import prepared_decoder
    decoder, state = prepared_decoder(generator, [prompt], config)
    with Stopwatch() as first:
        prefilled = decoder.prefill(state)
        int(prefilled.step)
    result = {"prefill_first_s": first.wall}
    if time_prefill:
        prefilled = None
        with Stopwatch() as prefill:
            prefilled = decoder.prefill(state)
            int(prefilled.step)
        result["prefill_s"] = prefill.wall
    state = None
    warm = decoder.advance(prefilled, tf.constant(2))
    int(warm.step)
    prefilled = None
    with Stopwatch() as decode:
        done = decoder.advance(warm, tf.constant(2 + new_tokens))
        steps = int(done.step) - int(warm.step)
    return {**result, "decode_s": decode.wall, "decode_cpu_s": decode.cpu, "decode_steps": steps,
            "tokens": decoder.row_tokens(done)[0]}


def step_ours(args, result: dict) -> None:
    quiet_tensorflow(args.verbose)
    import tensorflow as tf

    from generation.config import GenerationConfig
    from generation.generator import Generator
    result.update(phase="load", format=args.format, memory={},
                  intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads())
    with Stopwatch() as load:
        model = load_ours(args.source, args.format)
    result.update(load_s=load.wall, phase="quality logits")
    result["memory"]["load"] = memory_now()
    vocab = model.config.vocab_size
    np.save(args.logits, model(tf.constant(quality_ids(vocab, args.quality_prompts, args.quality_length),
                                           tf.int32)).logits.numpy())
    result["memory"]["quality"] = memory_now()
    result["phase"] = "greedy (prefill, then decode)"
    generator = Generator(model, args.compile)
    config = GenerationConfig(max_new_tokens=args.new + 2, pad_token_id=0)
    result["greedy"] = time_decoding(generator, prompt_ids(vocab, args.prompt), config, args.new)
    result["weight_bytes"], result["cache_bytes"] = decode_step_bytes(
        model, 1, cache_length(generator, args.prompt, config))
    result["memory"]["greedy"] = memory_now()
    if args.beams > 1:
        result["phase"] = "beam search"
        config = GenerationConfig(max_new_tokens=args.new + 2, num_beams=args.beams, pad_token_id=0)
        _, cache = decode_step_bytes(model, args.beams, cache_length(generator, args.beam_prompt, config))
        fits, why = enough_memory(3 * cache)       # a step's input, output and gathered caches
        result["beam"] = (time_decoding(generator, prompt_ids(vocab, args.beam_prompt), config, args.new,
                                        time_prefill=False) if fits else {"skipped": why})
        result["memory"]["beam"] = memory_now()


# ---- transformers ------------------------------------------------------------------------

def time_generate(model, ids: list[int], new_tokens: int, beams: int) -> dict:
    """transformers' `generate` for 2 + new_tokens tokens with no stop token, stamped after every
    step by a stopping criterion that never stops: the first stamp ends the prefill (and the first
    choice), the last `new_tokens` steps are the timed decode, as on our side."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[tuple[float, float]] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([ids])
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 2,
                             do_sample=False, num_beams=beams,
                             early_stopping=False, pad_token_id=0, eos_token_id=None,
                             stopping_criteria=StoppingCriteriaList([Stamp()]))
    (first, _), (warm, warm_cpu), (end, end_cpu) = stamps[0], stamps[1], stamps[-1]
    return {"prefill_s": first - start, "decode_s": end - warm, "decode_cpu_s": end_cpu - warm_cpu,
            "decode_steps": len(stamps) - 2, "tokens": out[0, ids.shape[1]:].tolist()}


def step_transformers(args, result: dict) -> None:
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(TORCH_THREADS)
    result.update(phase="load", memory={}, torch_threads=torch.get_num_threads())
    with Stopwatch() as load:
        model = transformers.GPTJForCausalLM.from_pretrained(args.source, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    result.update(load_s=load.wall, phase="quality logits")
    result["memory"]["load"] = memory_now()
    config = model.config
    with torch.no_grad():
        ids = torch.tensor(quality_ids(config.vocab_size, args.quality_prompts, args.quality_length))
        np.save(args.logits, model(ids).logits.float().numpy())
    result["memory"]["quality"] = memory_now()
    result["phase"] = "greedy (prefill, then decode)"
    time_generate(model, prompt_ids(config.vocab_size, 8), 1, 1)                        # warm up
    result["greedy"] = time_generate(model, prompt_ids(config.vocab_size, args.prompt), args.new, 1)
    head_dim = config.n_embd // config.n_head
    kv_per_token = 2 * config.n_layer * config.n_head * head_dim * 2                    # bf16 keys and values
    # weights read per step: all but the embedding table; the cache grows, so take its mean length
    result["weight_bytes"] = 2 * (sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel())
    result["cache_bytes"] = kv_per_token * (args.prompt + 2 + args.new // 2)
    result["memory"]["greedy"] = memory_now()
    if args.beams > 1:
        result["phase"] = "beam search"
        # transformers expands the prompt to every beam before the prefill, and its cache grows by copying
        fits, why = enough_memory(3 * args.beams * kv_per_token * (args.beam_prompt + args.new + 2))
        result["beam"] = (time_generate(model, prompt_ids(config.vocab_size, args.beam_prompt), args.new, args.beams)
                          if fits else {"skipped": why})
        result["memory"]["beam"] = memory_now()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    bandwidth = steps.add_parser("bandwidth")
    bandwidth.add_argument("--gib", type=float, default=1.0, help="array size")
    for name in ("ours", "transformers"):
        step = steps.add_parser(name)
        step.add_argument("--source", required=True, help="converted (ours) or HF (transformers) directory")
        step.add_argument("--logits", required=True, help=".npy file for the quality prompts' logits")
        step.add_argument("--prompt", type=int, default=1919, help="prompt tokens (prefill and greedy decode)")
        step.add_argument("--beam-prompt", type=int, default=1919, help="prompt tokens for beam search")
        step.add_argument("--new", type=int, default=32, help="timed decode steps")
        step.add_argument("--beams", type=int, default=4, help="beam search with this many beams (< 2: skip)")
        step.add_argument("--quality-prompts", type=int, default=4)
        step.add_argument("--quality-length", type=int, default=64)
        add_verbose_flag(step)
    steps.choices["ours"].add_argument("--format", required=True, choices=WEIGHT_FORMATS)
    steps.choices["ours"].add_argument("--compile", default="xla", choices=("xla", "graph"))
    for step in steps.choices.values():
        step.add_argument("--result", required=True, help="JSON file for the figures")
    args = parser.parse_args(argv)
    run = {"bandwidth": step_bandwidth, "ours": step_ours, "transformers": step_transformers}[args.step]
    result: dict = {}
    MemoryGuard(result, args.result)
    run(args, result)
    result.pop("phase", None)
    result["peak_rss_self"] = status_bytes("self", "VmHWM")
    atomic_write_text(args.result, json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
