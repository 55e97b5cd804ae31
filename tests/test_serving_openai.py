"""The clients people already run against serving.server: the official `openai` SDK (models,
logprobs, echo) and lm-evaluation-harness's `local-completions` model, whose multiple-choice
accuracy must equal lm-eval's own `hf` run of the same weights. The logprobs themselves equal
log_softmax of transformers' logits on those weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests

from checkpoint_utils.convert_hf import convert
from checkpoint_utils.load import load_model
from checkpoint_utils.rounding import U32, logits_atol
from serving.server import Limits, build_server
from tests.data_helpers import make_tiny_tokenizer
from tests.hf_models import hf_logits, make_hf_model, save_hf_model
from tests.runtime_helpers import run_result_script
from tests.serving_helpers import start_in_thread

VOCAB = 320                 # make_tiny_tokenizer's size
POSITIONS = 128
LIMITS = Limits(max_prompt_tokens=60, max_tokens=8, max_n=2, max_beams=2, request_timeout=60, max_logprobs=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A randomized tiny transformers GPT-J (every weight perturbed, so the distribution is far
    from uniform), converted to ours, and the tokenizer both sides use."""
    root = tmp_path_factory.mktemp("openai")
    hf = make_hf_model("gptj_basic", seed=3, vocab_size=VOCAB, n_positions=POSITIONS)
    save_hf_model(hf, str(root / "hf"))
    params = convert(str(root / "hf"), str(root / "tf"), progress=False)
    tokenizer = make_tiny_tokenizer(str(root / "tok"), vocab_size=VOCAB)
    return {"root": root, "hf": hf, "params": params, "model": load_model(params, str(root / "tf")),
            "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def url(setup):
    server = build_server(setup["model"], setup["tokenizer"], slots=2, limits=LIMITS, compile_mode="graph")
    uv, thread, base = start_in_thread(server)
    yield base
    uv.should_exit = True
    thread.join(30)


def reference_logprobs(setup, ids: list[int]) -> tuple[np.ndarray, float]:
    """(log_softmax of transformers' logits over ids[:-1] [T-1, V] in float64, the bound our float32
    logprobs must meet). Our logits differ from torch's by rounding, at most logits_atol (the
    forward's chain of sums, bounded from its length and the logits' size). A logprob
    z_i - logsumexp(z) moves by at most |dz_i| + max |dz|, so twice that, plus the rounding of our
    float32 log_softmax itself: a few u on values of size <= |z - max z| + log V."""
    logits = hf_logits(setup["hf"], np.asarray([ids[:-1]], np.int64))[0].astype(np.float64)       # [T-1, V]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    scale = float(np.abs(logits).max())
    bound = 2 * logits_atol(setup["params"], len(ids), scale) + 4 * U32 * (2 * scale + math.log(VOCAB))
    return logprobs, bound


def check_logprobs(setup, logprobs: dict, ids: list[int], first: int, top: int) -> None:
    """An OpenAI logprobs object for ids[first:] against transformers."""
    reference, bound = reference_logprobs(setup, ids)
    tokenizer = setup["tokenizer"]
    assert len(logprobs["tokens"]) == len(ids) - first
    for k, t in enumerate(range(first, len(ids))):
        assert logprobs["text_offset"][k] == len(tokenizer.decode(ids[:t])) or "\ufffd" in tokenizer.decode(ids[:t])
        assert logprobs["tokens"][k] == token_name(tokenizer, ids[t])
        if t == 0:
            assert logprobs["token_logprobs"][k] is None and logprobs["top_logprobs"][k] is None
            continue
        expected = reference[t - 1]                                                      # [V]
        assert abs(logprobs["token_logprobs"][k] - expected[ids[t]]) <= bound, (t, bound)
        best = logprobs["top_logprobs"][k]
        assert logprobs["tokens"][k] in best and best[logprobs["tokens"][k]] == logprobs["token_logprobs"][k]
        assert len(best) in (top, top + 1)               # the top n, and the token itself when not among them
        order = np.argsort(-expected)
        shown = sorted(best.values(), reverse=True)[:top]
        np.testing.assert_allclose(shown, expected[order[:top]], rtol=0, atol=bound)
        if top and expected[order[top - 1]] - expected[order[top]] > 2 * bound:     # no tie at the cut
            assert {token_name(tokenizer, int(i)) for i in order[:top]} <= set(best)


def token_name(tokenizer, token_id: int) -> str:
    """A token's name in OpenAI's logprobs: its text, or its bytes when it is part of a character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    return "bytes:" + "".join(f"\\x{b:02x}" for b in tokenizer.token_bytes(token_id))


@pytest.mark.numerics
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_logprobs_are_transformers_log_softmax_whatever_the_sampling(setup, url, temperature):
    """With echo, every prompt and generated token's logprob and the top 5 at each position are
    log_softmax of transformers' logits on the same weights: the model's own distribution, not
    the temperature-scaled one a sampled token was drawn from."""
    prompt = "the cat sat on the mat. def add(a, b):"
    body = {"prompt": prompt, "max_tokens": 6, "temperature": temperature, "seed": 4, "logprobs": 5,
            "echo": True, "ignore_eos": True}
    choice = requests.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    ids = setup["tokenizer"].encode(prompt) + choice["token_ids"]
    assert len(choice["token_ids"]) == 6 and choice["text"].startswith(prompt)
    check_logprobs(setup, choice["logprobs"], ids, first=0, top=5)


def test_openai_sdk_lists_the_model_and_scores_echoed_prompts(setup, url):
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["gptj"]
    assert client.models.retrieve("gptj").id == "gptj"
    tokenizer = setup["tokenizer"]
    prompt = tokenizer.encode("return a + b\nclass Counter:")
    echoed = client.completions.create(model="gptj", prompt=prompt, logprobs=2, echo=True, max_tokens=0)
    choice = echoed.choices[0]
    assert choice.text == tokenizer.decode(prompt) and choice.finish_reason == "length"
    assert echoed.usage.completion_tokens == 0 and echoed.usage.prompt_tokens == len(prompt)
    check_logprobs(setup, choice.logprobs.model_dump(), prompt, first=0, top=2)

    grown = client.completions.create(model="gptj", prompt=prompt, logprobs=2, echo=True, max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    choice = grown.choices[0]
    ids = prompt + choice.model_extra["token_ids"]
    assert choice.text == tokenizer.decode(ids) and len(ids) == len(prompt) + 4
    check_logprobs(setup, choice.logprobs.model_dump(), ids, first=0, top=2)

    # without echo: the generated tokens only, offsets counted from the prompt's start as OpenAI does
    plain = client.completions.create(model="gptj", prompt=prompt, logprobs=1, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    ids = prompt + plain.model_extra["token_ids"]
    assert plain.logprobs.text_offset[0] == len(tokenizer.decode(prompt))
    check_logprobs(setup, plain.logprobs.model_dump(), ids, first=len(prompt), top=1)

    streamed = client.completions.create(model="gptj", prompt=prompt, echo=True, max_tokens=4, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == grown.choices[0].text
    with pytest.raises(openai.NotFoundError, match="serves 'gptj'"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=1)


def test_a_list_of_prompts_gets_each_prompts_answer(setup, url):
    """lm-eval sends token-id prompts as a list of lists: n choices per prompt, in order."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    body = {"max_tokens": 3, "temperature": 0.7, "seed": 11, "logprobs": 1, "echo": True, "n": 2}
    together = requests.post(url + "/v1/completions", json={**body, "prompt": prompts}, timeout=120).json()
    assert [c["index"] for c in together["choices"]] == list(range(6))
    for index, prompt in enumerate(prompts):
        alone = requests.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=120).json()
        for sequence in range(2):
            got, want = together["choices"][index * 2 + sequence], alone["choices"][sequence]
            assert (got["text"], got["token_ids"], got["logprobs"]["tokens"]) == \
                (want["text"], want["token_ids"], want["logprobs"]["tokens"])
    assert together["usage"]["prompt_tokens"] == 9


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": 1, "logprobs": 6}, 400, "logprobs"),          # over --max-logprobs
    ({"prompt": "x", "max_tokens": 1, "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 1, "logprobs": "2"}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 1, "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 1, "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),                        # nothing to return
    ({"prompt": "x", "max_tokens": 1, "logprobs": 1, "stream": True}, 400, "logprobs"),
    ({"prompt": [[5, 6], []], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [[5, 6], "x"], "max_tokens": 1}, 400, "prompt"),                  # ids and text mixed
    ({"prompt": "x", "max_tokens": 1, "model": "other"}, 404, "model"),
])
def test_bad_scoring_requests_name_the_field(url, body, status, param):
    reply = requests.post(url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"]


# A tiny multiple-choice task in lm-eval's own YAML format, over a local JSON-lines file.
TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " self", " the data"], "answer": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " model", " token"], "answer": 0},
    {"question": "class Counter:\n    def __init__(self):\n        self.count =", "choices": [" 0", " mask",
                                                                                         " a"], "answer": 0},
    {"question": "A tokenizer splits text into", "choices": [" pieces.", " layer", " the value"], "answer": 0},
    {"question": "Numbers like 12345 and", "choices": [" 3.14159", " window", " attention"], "answer": 0},
    {"question": "the model of the data", "choices": [" is", " and", " to", " for"], "answer": 2},
]

# Runs in a fresh interpreter (lm-eval loads torch, datasets and its task registry; none of it
# belongs in the test process): both backends on the task, per-choice loglikelihoods and accuracies.
LM_EVAL_SCRIPT = """
import json, os, sys
task_dir, url, hf_dir, cache = sys.argv[1:5]
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=cache,
                  HF_DATASETS_CACHE=os.path.join(cache, "datasets"), TOKENIZERS_PARALLELISM="false")
import lm_eval
from lm_eval.tasks import TaskManager

tasks = TaskManager(include_path=task_dir, include_defaults=False)    # indexing lm-eval's own tasks takes 8 s

def run(model, args):
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_choice"], batch_size=1,
                                  task_manager=tasks, log_samples=True,
                                  bootstrap_iters=0, random_seed=0)
    samples = sorted(out["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    return {"acc": out["results"]["tiny_choice"]["acc,none"],
            "acc_norm": out["results"]["tiny_choice"]["acc_norm,none"],
            "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples]}

served = run("local-completions", {"model": "gptj", "base_url": url + "/v1/completions",
                                   "tokenizer_backend": "huggingface", "tokenizer": hf_dir, "max_retries": 1})
hf = run("hf", {"pretrained": hf_dir, "dtype": "float32", "device": "cpu"})
print("RESULT " + json.dumps({"served": served, "hf": hf}))
"""


@pytest.mark.numerics
def test_lm_eval_local_completions_scores_as_its_hf_backend(setup, url, tmp_path):
    """lm-eval's `local-completions` (logprobs=1, echo=true, max_tokens=1 per choice) against this
    server equals lm-eval's `hf` backend on the HF export of the served weights: the same
    accuracies, and each choice's loglikelihood within the logprob bound times its tokens."""
    from checkpoint_utils import export_hf
    root = setup["root"]
    exported = str(tmp_path / "export")
    export_hf.export(str(root / "tf" / "params.yaml"), str(root / "tf"), exported, progress=False,
                     tokenizer=str(root / "tok"))
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in DOCS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK_YAML.format(data=tmp_path / "docs.jsonl"))
    result = run_result_script(LM_EVAL_SCRIPT, str(tmp_path / "tasks"), url, exported, str(tmp_path / "cache"),
                               timeout=300)
    served, hf = result["served"], result["hf"]
    print("lm-eval accuracy: local-completions", served["acc"], served["acc_norm"], "hf", hf["acc"], hf["acc_norm"])
    # A choice's loglikelihood sums its k tokens' logprobs: each within the bound of
    # reference_logprobs (here for the longest doc, whose sums are the longest).
    longest = max(len(setup["tokenizer"].encode(d["question"] + c)) for d in DOCS for c in d["choices"])
    _, per_token = reference_logprobs(setup, list(range(2, 2 + longest)))
    for doc, ours, theirs in zip(DOCS, served["loglikelihoods"], hf["loglikelihoods"]):
        tokens = [len(setup["tokenizer"].encode(doc["question"] + c)) - len(setup["tokenizer"].encode(
            doc["question"])) for c in doc["choices"]]
        bound = max(tokens) * per_token
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=bound)
        # Equal accuracies follow only if no two choices are closer than twice the bound, for acc
        # (the loglikelihoods) and acc_norm (divided by the choice's length in characters).
        lengths = np.array([len(c) for c in doc["choices"]], np.float64)
        for scores, gap in ((np.array(theirs), 2 * bound), (np.array(theirs) / lengths, 2 * bound / lengths.min())):
            ranked = np.sort(scores)[::-1]
            assert ranked[0] - ranked[1] > gap, f"choices nearly tied in {doc}: pick others"
    assert (served["acc"], served["acc_norm"]) == (hf["acc"], hf["acc_norm"])
