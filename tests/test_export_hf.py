"""TF -> HF export: token ids, dropouts and tokenizer in the export, and user files kept on re-export."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from checkpoint_utils import convert_hf, export_hf
from checkpoint_utils.convert_hf import convert
from tests.data_helpers import SAMPLE_TEXT, make_tiny_tokenizer
from tests.hf_models import make_hf_model, save_hf_model

TOKENIZER_VOCAB = 320          # make_tiny_tokenizer's size; the models below embed at least that many ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=TOKENIZER_VOCAB)


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def _params_with(source_params, target, **model_changes):
    raw = yaml.safe_load(open(source_params))
    raw["model"].update(model_changes)
    target.write_text(yaml.safe_dump(raw))
    return str(target)


def test_neox_export_carries_the_sources_token_ids_and_dropouts(tmp_path):
    """Ids and dropouts other than GPT-J's defaults survive HF -> TF -> HF."""
    hf = save_hf_model(make_hf_model("neox_basic", seed=1, bos_token_id=3, eos_token_id=5,
                                     attention_dropout=0.125, hidden_dropout=0.25), str(tmp_path / "hf"))
    params = convert(hf, str(tmp_path / "tf"), progress=False)
    assert (params.attention_dropout_rate, params.residual_dropout_rate, params.embedding_dropout_rate) == \
        (0.125, 0.25, 0.25)
    export_hf.export(str(tmp_path / "tf" / "params.yaml"), str(tmp_path / "tf"), str(tmp_path / "out"),
                     progress=False)
    config = _config(tmp_path / "out")
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 5)
    assert (config["attention_dropout"], config["hidden_dropout"]) == (0.125, 0.25)
    # GPT-NeoX has one rate for embeddings and residuals: a different embedding rate is reported
    params = _params_with(tmp_path / "tf" / "params.yaml", tmp_path / "params.yaml", embedding_dropout_rate=0.1)
    result = export_hf.export(params, str(tmp_path / "tf"), str(tmp_path / "out"), progress=False)
    assert "embedding_dropout_rate=0.1 differs" in result.dropout_note and _config(tmp_path / "out")[
        "hidden_dropout"] == 0.25


def test_gptj_dropouts_come_from_the_params(tmp_path):
    import transformers
    hf = save_hf_model(make_hf_model("gptj_basic"), str(tmp_path / "hf"))
    convert(hf, str(tmp_path / "tf"), progress=False)
    params = _params_with(tmp_path / "tf" / "params.yaml", tmp_path / "params.yaml", embedding_dropout_rate=0.1,
                          attention_dropout_rate=0.2, residual_dropout_rate=0.3)
    export_hf.export(params, str(tmp_path / "tf"), str(tmp_path / "out"), progress=False)
    loaded = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert (loaded.embd_pdrop, loaded.attn_pdrop, loaded.resid_pdrop) == (0.1, 0.2, 0.3)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 0)     # gptj_basic's, from conversion.json


def _demo_model(tmp_path, vocab_size=TOKENIZER_VOCAB):
    """A randomly initialised tiny GPT-J checkpoint, as a from-scratch training run leaves one."""
    import tensorflow as tf

    from config.params import load_params
    from model import GPTJModel
    params_path = tmp_path / "run" / "params.yaml"
    params_path.parent.mkdir()
    params_path.write_text(yaml.safe_dump({"model": {
        "vocab_size": vocab_size, "hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "rotary_dim": 4,
        "filter_size": 32, "max_position_embeddings": 32}}))
    model = GPTJModel(load_params(str(params_path)).model)
    tf.train.Checkpoint(model=model).write(str(tmp_path / "run" / "ckpt-1"))
    return str(params_path), str(tmp_path / "run" / "ckpt-1")


def test_demo_tokenizer_model_exports_ids_and_a_tokenizer_autotokenizer_loads(tmp_path, tokenizer, capsys):
    import transformers
    params, checkpoint = _demo_model(tmp_path)
    out = tmp_path / "out"
    assert export_hf.main(["--params", params, "--checkpoint", checkpoint, "--output-dir", str(out),
                           "--tokenizer", tokenizer.source, "--no-progress"]) == 0
    assert f"bos/eos_token_id {tokenizer.eos_id}/{tokenizer.eos_id} from --tokenizer" in capsys.readouterr().out
    config = _config(out)
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eos_id
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    text = SAMPLE_TEXT + "<|endoftext|>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token_id == tokenizer.eos_id and loaded.decode(tokenizer.encode(text)) == text
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)).generation_config.eos_token_id == \
        tokenizer.eos_id


def test_unknown_token_ids_are_null_with_a_warning(tmp_path, capsys):
    params, checkpoint = _demo_model(tmp_path)
    assert export_hf.main(["--params", params, "--checkpoint", checkpoint, "--output-dir",
                           str(tmp_path / "out"), "--no-progress"]) == 0
    config = _config(tmp_path / "out")
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    assert "warning: no tokenizer given or recorded" in capsys.readouterr().err


def test_tokenizer_too_big_for_the_model_is_refused_and_nothing_written(tmp_path, tokenizer, capsys):
    params, checkpoint = _demo_model(tmp_path, vocab_size=64)
    assert export_hf.main(["--params", params, "--checkpoint", checkpoint, "--output-dir",
                           str(tmp_path / "out"), "--tokenizer", tokenizer.source, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer") and "model.vocab_size=64" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_recorded_tokenizer_travels_from_source_to_export_and_through_a_warm_started_run(tmp_path, tokenizer):
    """convert_hf records the source's tokenizer; export finds it beside the checkpoint, or through the
    run's runconfig.checkpoint_path."""
    import transformers
    hf = save_hf_model(make_hf_model("neox_basic", vocab_size=TOKENIZER_VOCAB, bos_token_id=tokenizer.eos_id,
                                     eos_token_id=tokenizer.eos_id), str(tmp_path / "hf"))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer.source, name), hf)
    convert(hf, str(tmp_path / "tf"), progress=False)
    assert sorted(os.listdir(tmp_path / "tf" / "tokenizer")) == ["merges.txt", "tokenizer.json", "vocab.json"]
    run = tmp_path / "run"                      # a run warm-started from the conversion, one checkpoint later
    run.mkdir()
    for name in os.listdir(tmp_path / "tf"):
        if name.startswith("ckpt-0."):
            shutil.copy(tmp_path / "tf" / name, run / name.replace("ckpt-0", "ckpt-7"))
    raw = yaml.safe_load(open(tmp_path / "tf" / "params.yaml"))
    raw["runconfig"] = {"checkpoint_path": str(tmp_path / "tf")}
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    result = export_hf.export(str(run / "params.yaml"), str(run / "ckpt-7"), str(tmp_path / "out"),
                              progress=False)
    assert result.tokenizer_from == str(tmp_path / "tf" / "tokenizer")
    assert result.ids_from == str(tmp_path / "tf" / "conversion.json")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert type(loaded).__name__.startswith("GPTNeoXTokenizer")
    assert loaded.encode(SAMPLE_TEXT) == tokenizer.encode(SAMPLE_TEXT)


def test_reexport_replaces_only_the_exporters_files(tmp_path):
    hf = save_hf_model(make_hf_model("gptj_basic"), str(tmp_path / "hf"))
    convert(hf, str(tmp_path / "tf"), progress=False)
    params, out = str(tmp_path / "tf" / "params.yaml"), tmp_path / "out"
    export_hf.export(params, str(tmp_path / "tf"), str(out), max_shard_bytes=30_000, progress=False)
    shards = sorted(p for p in os.listdir(out) if p.startswith("model-"))
    assert len(shards) > 1
    (out / "README.md").write_text("my model card")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    export_hf.export(params, str(tmp_path / "tf"), str(out), progress=False)      # one file this time
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "eval", "model.safetensors"]
    assert (out / "README.md").read_text() == "my model card" and (out / "eval" / "scores.json").exists()
    export_hf.export(params, str(tmp_path / "tf"), str(out), dtype="float16", progress=False)
    assert _config(out)["torch_dtype"] == "float16" and (out / "README.md").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]      # no temp dirs left behind


def test_source_that_is_neither_a_directory_nor_on_the_hub_is_one_line(tmp_path, monkeypatch, capsys):
    argv = ["--source", "does_not_exist/model", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert convert_hf.main(argv) == 2
    offline = capsys.readouterr().err
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nAn error "
                                      "happened while trying to locate the files on the Hub. Please check")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert convert_hf.main(argv) == 2
    online = capsys.readouterr().err
    for err in (offline, online):
        assert err.startswith("error: --source 'does_not_exist/model' is not a local directory and not "
                              "reachable on the hub (")
        assert err.count("\n") == 1
    assert "HF_HUB_OFFLINE is set" in offline and "Name or service not known" in online
    assert not (tmp_path / "out").exists()
