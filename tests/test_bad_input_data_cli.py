"""Bad input to the CLIs (records, preprocessing inputs, checkpoints, exports, prompts, overrides):
exit 2, one `error:` line, and nothing on disk changed (hashed before and after)."""
from __future__ import annotations


import pytest
import yaml

import run
from checkpoint_utils import convert_hf, export_hf, verify
from input.scripts.pile import preprocess
from tests.disk_state import snapshot
from tests.data_helpers import cut_at_record_border, make_tiny_tfrecords, make_tiny_tokenizer, write_stats_json

MODEL = {"vocab_size": 300, "hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "rotary_dim": 4,
         "filter_size": 32, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases point at: records cut at a record border, a checkpoint, a tokenizer, params."""
    import tensorflow as tf

    from config.params import load_params
    from model import GPTJModel
    root = tmp_path_factory.mktemp("bad_input")
    make_tiny_tfrecords(str(root / "records"), num_examples=24, shard_size=5, seq_len=16)    # 5, 5, 5, 5, 4
    write_stats_json(str(root / "records"), [5, 5, 5, 5, 4])
    cut_at_record_border(str(root / "records" / "train-00001.tfrecord"), 3)
    section = {"data_dir": str(root / "records"), "batch_size": 2, "max_sequence_length": 16}
    (root / "params.yaml").write_text(yaml.safe_dump({"model": MODEL, "train_input": section,
                                                      "eval_input": section}))
    tf.train.Checkpoint(model=GPTJModel(load_params(str(root / "params.yaml")).model)).write(str(root / "ckpt-1"))
    make_tiny_tokenizer(str(root / "tokenizer"))                # 320 tokens: more than the model's 300
    make_tiny_tokenizer(str(root / "small_tokenizer"), vocab_size=260)
    (root / "empty.txt").write_text("")
    (root / "doc.txt").write_text("a document")
    (root / "not_hf").mkdir()
    (root / "not_hf" / "notes.txt").write_text("mine")
    (root / "foreign" / "train").mkdir(parents=True)
    (root / "foreign" / "train" / "other.tfrecord").write_bytes(b"someone else's")
    (root / "model_dir").mkdir()
    return root


CASES = {
    "records cut at a record border": (run.main, lambda r: [
        "--mode", "eval", "--params", f"{r}/params.yaml", "--model_dir", f"{r}/model_dir",
        "--checkpoint_path", f"{r}/ckpt-1"], "train-00001.tfrecord holds 3 records"),
    "override that breaks the model": (run.main, lambda r: [
        "--mode", "train", "--params", f"{r}/params.yaml", "--model_dir", f"{r}/model_dir",
        "--set", "model.num_heads=3"], "override 'model.num_heads=3': model.hidden_size=16 is not divisible"),
    "too many new tokens": (run.main, lambda r: [
        "--mode", "predict", "--params", f"{r}/params.yaml", "--model_dir", f"{r}/model_dir",
        "--tokenizer", f"{r}/small_tokenizer", "--prompt", "the", "--max_new_tokens", "100000"],
        "max_new_tokens=100000 leaves no position for the prompt"),
    "empty preprocessing input": (preprocess.main, lambda r: [
        "--input", f"{r}/empty.txt", "--output-dir", f"{r}/records_out", "--tokenizer", f"{r}/tokenizer",
        "--workers", "0", "--no-progress"], "no example for split train"),
    "missing preprocessing input": (preprocess.main, lambda r: [
        "--input", f"{r}/absent.jsonl", "--output-dir", f"{r}/records_out", "--tokenizer", f"{r}/tokenizer",
        "--no-progress"], "absent.jsonl matches no"),
    "preprocessing over foreign shards": (preprocess.main, lambda r: [
        "--input", f"{r}/doc.txt", "--output-dir", f"{r}/foreign", "--tokenizer", f"{r}/tokenizer",
        "--workers", "0", "--no-progress"], ".tfrecord files not written by this tool"),
    "convert from a source that does not exist": (convert_hf.main, lambda r: [
        "--source", "does_not_exist/model", "--output-dir", f"{r}/converted"],
        "not a local directory and not reachable on the hub"),
    "convert from a directory without config.json": (convert_hf.main, lambda r: [
        "--source", f"{r}/not_hf", "--output-dir", f"{r}/converted"], "has no config.json"),
    "export of a missing checkpoint": (export_hf.main, lambda r: [
        "--params", f"{r}/params.yaml", "--checkpoint", f"{r}/ckpt-9", "--output-dir", f"{r}/hf"],
        "no TF checkpoint at"),
    "export over unrelated files": (export_hf.main, lambda r: [
        "--params", f"{r}/params.yaml", "--checkpoint", f"{r}/ckpt-1", "--output-dir", f"{r}/not_hf",
        "--no-progress"], "already holds files that are not a Hugging Face checkpoint"),
    "export with a tokenizer larger than the model": (export_hf.main, lambda r: [
        "--params", f"{r}/params.yaml", "--checkpoint", f"{r}/ckpt-1", "--output-dir", f"{r}/hf",
        "--tokenizer", f"{r}/tokenizer"], "model.vocab_size=300"),
    "verify a directory that is not there": (verify.main, lambda r: [
        "--source", f"{r}/not_hf", "--converted", f"{r}/absent"], "is not a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, case, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    main, argv, message = CASES[case]
    before = snapshot(str(world))
    capsys.readouterr()
    assert main(argv(world)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(str(world)) == before
