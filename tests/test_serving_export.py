"""serving.export: a fresh process that imports only TensorFlow gets the Generator's tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from generation.config import GenerationConfig
from generation.generator import Generator
from serving import export
from tests.runtime_helpers import saved_random_model

VOCAB = 97

# Runs in a clean interpreter: loads the SavedModel with TensorFlow alone and prints its outputs.
LOADER = r"""
import json, sys
import tensorflow as tf
path, requests = sys.argv[1], json.loads(sys.stdin.read())
loaded = tf.saved_model.load(path)
out = []
for name, inputs in requests:
    function = loaded.signatures[name]
    specs = function.structured_input_signature[1]
    result = function(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()})
    out.append({k: v.numpy().tolist() for k, v in result.items()})
project = [m for m in sys.modules if m.split(".")[0] in ("model", "generation", "serving", "layers", "config")]
print(json.dumps({"results": out, "project_modules": project}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    params, model, checkpoint = saved_random_model(root, 7, vocab_size=VOCAB, max_position_embeddings=64)
    out = str(root / "saved")
    argv = ["--params", params, "--checkpoint_path", checkpoint, "--output-dir", out,
            "--num-beams", "3", "--beam-prompt-length", "16", "--beam-max-new-tokens", "5", "--beam-stop-id", "3"]
    assert export.main(argv) == 0
    return model, out


def run_fresh(path: str, requests: list) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOADER, path], input=json.dumps(requests), capture_output=True,
                          text=True, timeout=300, env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["project_modules"] == []          # TensorFlow alone ran it
    return reply["results"]


def signature_inputs(prompts, config: GenerationConfig, seeds) -> dict:
    width = max(len(p) for p in prompts)
    return {"token_ids": [p + [0] * (width - len(p)) for p in prompts], "lengths": [len(p) for p in prompts],
            "max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
            "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
            "repetition_penalty": config.repetition_penalty, "min_new_tokens": config.min_new_tokens,
            "seeds": list(seeds), "stop_ids": list(config.stop_token_ids)}


def test_fresh_process_gets_the_generators_tokens(exported):
    model, path = exported
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, VOCAB, size=n).tolist() for n in (3, 9, 6)]
    configs = [GenerationConfig(max_new_tokens=7, stop_token_ids=(3,), pad_token_id=3),
               GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=30, top_p=0.9,
                                repetition_penalty=1.2, min_new_tokens=2, stop_token_ids=(3, 5))]
    beam = GenerationConfig(num_beams=3, max_new_tokens=5, stop_token_ids=(3,), pad_token_id=3)
    seeds = [4, 19, 2]
    requests = [["serving_default", signature_inputs(prompts, c, seeds)] for c in configs]
    requests += [["beam_search", {"token_ids": [p], "length": len(p)}] for p in prompts[:2]]
    results = run_fresh(path, requests)

    generator = Generator(model, compile_mode="eager")
    for config, result in zip(configs, results[:2]):
        expected = generator.generate(prompts, config, seeds=seeds)
        got = [ids[:n] for ids, n in zip(result["output_ids"], result["lengths"])]
        assert got == [g.token_ids for g in expected]
        assert all(all(t == export.PAD_OUTPUT for t in ids[n:]) for ids, n in zip(result["output_ids"], result["lengths"]))
    for prompt, result in zip(prompts[:2], results[2:]):
        expected = generator.generate([prompt], beam)[0]
        assert result["output_ids"][0][:result["lengths"][0]] == expected.token_ids


def test_export_refuses_a_non_empty_output_dir(exported, tmp_path, capsys):
    (tmp_path / "x").write_text("keep")
    assert export.main(["--params", "p.yaml", "--model-dir", "m", "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
