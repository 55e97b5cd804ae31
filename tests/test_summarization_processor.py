"""SummarizationTfRecordsProcessor: chosen by name through data.input_fn, the same batches as
GptTfRecordsProcessor (shuffle, shards, resume position), its checks, and a loss that counts
exactly the summary positions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import data
from config import modes
from config.params import parse_params
from fine_tuning.abstractive_summarization.prepare import prepare
from input.errors import InputDataError
from input.gpt_tfrecords_processor import GptTfRecordsProcessor
from input.records import serialize_example
from input.summarization_processor import SummarizationTfRecordsProcessor
from model import build_model, model_fn
from tests.data_helpers import make_tiny_tokenizer

SEQ, SEP, VOCAB = 48, 400, 512


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(train records dir, tokenizer): 14 short articles in shards of 4."""
    root = tmp_path_factory.mktemp("summ")
    tokenizer = make_tiny_tokenizer(str(root / "tok"))
    with open(root / "in.jsonl", "w") as f:
        for i in range(14):
            f.write(json.dumps({"id": str(i), "article": f"doc {i}: the model reads " + "data " * (i % 4),
                                "highlights": "a mask" + " token" * (i % 3)}) + "\n")
    prepare([str(root / "in.jsonl")], str(root / "out"), tokenizer, max_sequence_length=SEQ, sep_id=SEP,
            model_vocab_size=VOCAB, shard_size=4, progress=False)
    return str(root / "out" / "train"), tokenizer


def params_for(data_dir: str, processor: str = "SummarizationTfRecordsProcessor", **train):
    return parse_params({
        "train_input": {"data_processor": processor, "data_dir": data_dir, "batch_size": 4, "max_sequence_length": SEQ,
                        "shuffle_buffer": 5, "shuffle_seed": 3, **train},
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4, "rotary_dim": 4,
                  "filter_size": 64, "max_position_embeddings": 64}})


def batches(dataset, count):
    out = []
    for features, labels in dataset.take(count):
        out.append({**{k: v.numpy() for k, v in features.items()}, "labels": labels.numpy()})
    return out


def test_chosen_by_name_and_reads_like_the_gpt_processor(records):
    data_dir, _ = records
    params = params_for(data_dir)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    for position, input_context in ((0, None), (5, None), (3, context)):
        ours = data.input_fn(params, modes.TRAIN, input_context, position)
        reference = GptTfRecordsProcessor(params.train_input, params.model, "train_input").create_dataset(
            input_context, position)
        got, want = batches(ours, 6), batches(reference, 6)
        assert len(got) == 6
        for a, b in zip(got, want):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    assert isinstance(data.PROCESSORS["SummarizationTfRecordsProcessor"](params.train_input, params.model, "x"),
                      SummarizationTfRecordsProcessor)


def test_loss_is_the_cross_entropy_of_the_summary_positions_only(records):
    data_dir, tokenizer = records
    params = params_for(data_dir, shuffle=False)
    features, labels = next(iter(data.input_fn(params, modes.TRAIN)))
    model = build_model(params)
    spec = model_fn(features, labels, modes.TRAIN, params, model)
    ids, targets = features["input_ids"].numpy(), labels.numpy()                       # [b, S]
    # The mask by hand: from the sep position to the first eos label after it (the summary's end).
    mask = np.zeros_like(ids)
    for row in range(ids.shape[0]):
        start = int(np.flatnonzero(ids[row] == SEP)[0])
        end = start + int(np.flatnonzero(targets[row, start:] == tokenizer.eos_id)[0])
        mask[row, start:end + 1] = 1
    np.testing.assert_array_equal(mask, features["input_mask"].numpy())
    logits = model(features["input_ids"]).logits.numpy().astype(np.float64)            # [b, S, V]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    cross_entropy = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]   # [b, S]
    expected = (cross_entropy * mask).sum() / mask.sum()
    # float32 log-softmax over V=512 logits of size ~1: each term is off by a few ulp (~1e-6
    # relative), and a mean of such terms keeps that bound.
    np.testing.assert_allclose(float(spec.loss), expected, rtol=1e-5)
    assert float(spec.sums["tokens"]) == mask.sum()
    # and the article positions do not count: changing their labels leaves the loss as is
    scrambled = np.where(mask == 1, targets, (targets + 7) % VOCAB)
    again = model_fn(features, tf.constant(scrambled, tf.int32), modes.TRAIN, params, model)
    assert float(again.loss) == float(spec.loss)


def test_refuses_records_that_are_not_summarization_records(tmp_path, records):
    data_dir, _ = records
    pile_dir = tmp_path / "pile"
    pile_dir.mkdir()
    with open(data_dir + "/train-00000.tfrecord", "rb") as f:
        (pile_dir / "train-00000.tfrecord").write_bytes(f.read())
    with pytest.raises(InputDataError, match=r"pile does not hold summarization records \(it has no stats.json\)"):
        data.input_fn(params_for(str(pile_dir)), modes.TRAIN)
    (pile_dir / "stats.json").write_text(json.dumps({"split": "train", "shards": []}))
    with pytest.raises(InputDataError, match="record_layout None.*GptTfRecordsProcessor"):
        data.input_fn(params_for(str(pile_dir)), modes.TRAIN)


def test_a_record_without_counted_labels_fails_naming_its_file(tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    path = str(directory / "train-00000.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for mask_value in (1, 0):
            ids = np.arange(SEQ) % 50
            writer.write(serialize_example(ids, ids, np.full(SEQ, mask_value)))
    (directory / "stats.json").write_text(json.dumps({"record_layout": "summarization"}))
    dataset = data.input_fn(params_for(str(directory), shuffle=False, batch_size=2), modes.TRAIN)
    with pytest.raises(tf.errors.InvalidArgumentError, match="train-00000.tfrecord: a record has input_mask all 0"):
        next(iter(dataset))
