"""GptTfRecordsProcessor through data.input_fn: values, order, sharding, resume, and bad input."""
import logging

import numpy as np
import pytest
import tensorflow as tf

from data import input_fn
from input.errors import InputDataError
from input.records import serialize_example
from config import modes
from config.params import ParamsError, parse_params
from tests.data_helpers import (cut_at_record_border, example_tokens, make_tiny_preprocessed, make_tiny_tfrecords,
                               write_stats_json)

SEQ, VOCAB = 8, 64


def _params(data_dir, *, eval_dir=None, vocab_size=VOCAB, seq=SEQ, **train_input):
    section = {"data_dir": str(data_dir), "batch_size": 4, "max_sequence_length": seq, "shuffle": False,
               "repeat": False, "drop_remainder": False, "num_parallel_reads": 1}
    section.update(train_input)
    raw = {"model": {"vocab_size": vocab_size, "hidden_size": 8, "num_heads": 2, "rotary_dim": 2,
                     "max_position_embeddings": 64},
           "train_input": section}
    if eval_dir is not None:
        raw["eval_input"] = {"data_dir": str(eval_dir), "batch_size": 5, "max_sequence_length": seq,
                             "num_parallel_reads": 1}
    return parse_params(raw)


def _example_index(row):
    """Which `make_tiny_tfrecords` example a row of input_ids is (its first id is 7 * index mod 64)."""
    return int(row[0]) * 55 % VOCAB           # 55 = 7^-1 mod 64


def _indices(dataset, batches=None):
    out = []
    for k, (features, _) in enumerate(dataset):
        if batches is not None and k == batches:
            break
        out.append([_example_index(r) for r in features["input_ids"].numpy()])
    return out


class _Context:
    """The attributes of tf.distribute.InputContext the processor reads."""

    def __init__(self, pipelines, pipeline_id, replicas):
        self.num_input_pipelines = pipelines
        self.input_pipeline_id = pipeline_id
        self.num_replicas_in_sync = replicas

    def get_per_replica_batch_size(self, global_batch):
        return global_batch // self.num_replicas_in_sync


def test_batches_hold_the_records_values(tmp_path):
    examples = make_tiny_tfrecords(str(tmp_path), num_examples=23, seq_len=SEQ, vocab_size=VOCAB, padded_last=True)
    batches = list(input_fn(_params(tmp_path), modes.TRAIN))
    assert len(batches) == 6
    features, labels = batches[0]
    assert set(features) == {"input_ids", "input_mask"}
    assert features["input_ids"].dtype == features["input_mask"].dtype == labels.dtype == tf.int32
    assert features["input_ids"].shape == labels.shape == (4, SEQ)
    got = {k: np.concatenate([(f[k] if k != "labels" else l).numpy() for f, l in batches])
           for k in ("input_ids", "input_mask", "labels")}
    for key in got:        # shuffle off, one reader: file order, record order
        np.testing.assert_array_equal(got[key], np.stack([e[key] for e in examples]))
    np.testing.assert_array_equal(got["labels"][:, :-1], got["input_ids"][:, 1:])
    assert got["input_mask"][-1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batches[-1][1].shape == (3, SEQ)      # drop_remainder false keeps the short batch


def test_eval_mode_reads_eval_input_and_missing_section_is_clear(tmp_path):
    make_tiny_tfrecords(str(tmp_path / "train"), num_examples=10)
    make_tiny_tfrecords(str(tmp_path / "eval"), num_examples=12, prefix="val")
    batches = _indices(input_fn(_params(tmp_path / "train", eval_dir=tmp_path / "eval"), modes.EVAL))
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    with pytest.raises(ParamsError, match=r"mode 'eval' reads params.eval_input, which is missing"):
        input_fn(_params(tmp_path / "train"), modes.EVAL)
    with pytest.raises(ValueError, match="mode 'fit' is not one of"):
        input_fn(_params(tmp_path / "train"), "fit")


def test_parallel_reads_cover_every_record_once(tmp_path):
    make_tiny_tfrecords(str(tmp_path), num_examples=24)
    params = _params(tmp_path, num_parallel_reads=3)
    order = sum(_indices(input_fn(params, modes.TRAIN)), [])
    assert sorted(order) == list(range(24)) and order != list(range(24))
    assert sum(_indices(input_fn(params, modes.TRAIN)), []) == order


def test_shuffle_is_a_seeded_permutation_per_epoch(tmp_path):
    make_tiny_tfrecords(str(tmp_path), num_examples=24)
    params = _params(tmp_path, shuffle=True, repeat=True, shuffle_buffer=7, num_parallel_reads=2)
    order = sum(_indices(input_fn(params, modes.TRAIN), batches=12), [])
    epochs = order[:24], order[24:]
    assert all(sorted(e) == list(range(24)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(24))
    assert sum(_indices(input_fn(params, modes.TRAIN), batches=12), []) == order
    tf.random.set_seed(1234)          # the order must not depend on TF's global seed
    assert sum(_indices(input_fn(params, modes.TRAIN), batches=12), []) == order
    other = _params(tmp_path, shuffle=True, repeat=True, shuffle_buffer=7, num_parallel_reads=2, shuffle_seed=5)
    assert sum(_indices(input_fn(other, modes.TRAIN), batches=12), []) != order


@pytest.mark.parametrize("shard_size", [5, 24], ids=["by_file", "by_record"])
def test_input_contexts_are_disjoint_and_complete(tmp_path, shard_size):
    make_tiny_tfrecords(str(tmp_path), num_examples=24, shard_size=shard_size)
    params = _params(tmp_path, shuffle=True, num_parallel_reads=2)
    seen = []
    for pipeline in (0, 1):
        batches = list(input_fn(params, modes.TRAIN, input_context=_Context(2, pipeline, 2)))
        assert batches[0][0]["input_ids"].shape == (2, SEQ)       # global batch 4 over 2 replicas
        seen.append({_example_index(r) for f, _ in batches for r in f["input_ids"].numpy()})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))
    with pytest.raises(ParamsError, match="batch_size=4 is the global batch and must be divisible by the 3"):
        input_fn(params, modes.TRAIN, input_context=_Context(3, 0, 3))


@pytest.mark.parametrize("context", [None, _Context(2, 1, 1)], ids=["single", "pipeline_1_of_2"])
def test_resume_at_data_position_equals_the_uninterrupted_stream(tmp_path, context):
    make_tiny_tfrecords(str(tmp_path), num_examples=22)   # 22 records: epochs end mid-batch
    params = _params(tmp_path, shuffle=True, repeat=True, shuffle_buffer=6, num_parallel_reads=2)
    full = _indices(input_fn(params, modes.TRAIN, input_context=context), batches=16)
    for position in (1, 5, 6, 11):
        resumed = _indices(input_fn(params, modes.TRAIN, input_context=context, data_position=position),
                           batches=16 - position)
        assert resumed == full[position:], position


def test_resume_without_repeat_and_with_skip_corrupt_records(tmp_path):
    make_tiny_tfrecords(str(tmp_path), num_examples=22)
    once = _params(tmp_path, shuffle=True, shuffle_buffer=6)
    full = _indices(input_fn(once, modes.TRAIN))
    assert _indices(input_fn(once, modes.TRAIN, data_position=2)) == full[2:]
    assert _indices(input_fn(once, modes.TRAIN, data_position=len(full))) == []
    sequential = _params(tmp_path, shuffle=True, repeat=True, shuffle_buffer=6, skip_corrupt_records=True)
    stream = _indices(input_fn(sequential, modes.TRAIN), batches=14)
    assert _indices(input_fn(sequential, modes.TRAIN, data_position=8), batches=6) == stream[8:]


def test_reads_what_preprocessing_wrote(tmp_path):
    stats = make_tiny_preprocessed(str(tmp_path), seq_len=16, shard_size=8)
    params = _params(tmp_path / "tfrecords" / "train", eval_dir=tmp_path / "tfrecords" / "val", seq=16,
                     vocab_size=320)
    train = list(input_fn(params, modes.TRAIN))
    assert sum(l.shape[0] for _, l in train) == stats["train"]["examples"]
    ids = np.concatenate([f["input_ids"].numpy() for f, _ in train])
    labels = np.concatenate([l.numpy() for _, l in train])
    np.testing.assert_array_equal(labels[:-1, -1], ids[1:, 0])    # windows overlap by one token
    assert sum(l.shape[0] for _, l in input_fn(params, modes.EVAL)) == stats["val"]["examples"]


# ----------------------------------------------------------------- bad input

def _write(path, examples):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for ex in examples:
            writer.write(ex if isinstance(ex, bytes) else serialize_example(*ex))


def _ok(i, seq=SEQ):
    tokens = example_tokens(i, seq, VOCAB)
    return tokens[:-1], tokens[1:], np.ones(seq, dtype=np.int64)


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(InputDataError, match=rf"train_input.data_dir {tmp_path}/nope is not a directory"):
        input_fn(_params(tmp_path / "nope"), modes.TRAIN)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no records here")
    with pytest.raises(InputDataError, match=rf"{tmp_path}/empty holds no \*.tfrecord files.*preprocess"):
        input_fn(_params(tmp_path / "empty"), modes.TRAIN)


def test_first_record_problems_fail_before_reading(tmp_path):
    make_tiny_tfrecords(str(tmp_path / "long"), num_examples=3, seq_len=12)
    with pytest.raises(InputDataError, match=r"long/train-00000.tfrecord: feature 'input_ids' has 12 tokens per "
                                             r"record but train_input.max_sequence_length=8"):
        input_fn(_params(tmp_path / "long"), modes.TRAIN)
    (tmp_path / "nomask").mkdir()
    ids, labels, _ = _ok(0)
    tokens_only = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(int64_list=tf.train.Int64List(value=v)) for k, v in (("input_ids", ids), ("labels", labels))}))
    _write(tmp_path / "nomask" / "a.tfrecord", [tokens_only.SerializeToString()])
    with pytest.raises(InputDataError, match=r"nomask/a.tfrecord: the first record has no feature 'input_mask'"):
        input_fn(_params(tmp_path / "nomask"), modes.TRAIN)
    make_tiny_tfrecords(str(tmp_path / "bigvocab"), num_examples=3)
    with pytest.raises(InputDataError, match=r"bigvocab/train-00000.tfrecord: token id \d+ in 'input_ids' is outside "
                                             r"model.vocab_size=16"):
        input_fn(_params(tmp_path / "bigvocab", vocab_size=16), modes.TRAIN)


def test_later_bad_records_fail_naming_the_file(tmp_path):
    (tmp_path / "length").mkdir()
    bad_path = tmp_path / "length" / "b.tfrecord"
    _write(tmp_path / "length" / "a.tfrecord", [_ok(i) for i in range(4)])
    _write(bad_path, [_ok(4), _ok(5), _ok(6, seq=SEQ + 2)])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{bad_path}: a record has 10 values of feature input_ids .*max_sequence_length=8"):
        list(input_fn(_params(tmp_path / "length"), modes.TRAIN))

    (tmp_path / "vocab").mkdir()
    ids, labels, mask = _ok(2)
    labels = labels.copy()
    labels[3] = 100
    bad_path = tmp_path / "vocab" / "b.tfrecord"
    _write(tmp_path / "vocab" / "a.tfrecord", [_ok(0)])
    _write(bad_path, [_ok(1), (ids, labels, mask)])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{bad_path}: token id 100 in labels is outside model.vocab_size=64"):
        list(input_fn(_params(tmp_path / "vocab"), modes.TRAIN))


def test_truncated_file_is_named_up_front_or_skipped(tmp_path, caplog):
    make_tiny_tfrecords(str(tmp_path), num_examples=10, shard_size=5)
    path = tmp_path / "train-00001.tfrecord"
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(InputDataError, match=rf"{path} is truncated: record 4 .*skip_corrupt_records: true"):
        input_fn(_params(tmp_path), modes.TRAIN)
    with caplog.at_level(logging.WARNING):
        batches = _indices(input_fn(_params(tmp_path, skip_corrupt_records=True), modes.TRAIN))
    assert sum(batches, []) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert f"{path} is truncated" in caplog.text and "reading its 4 good records" in caplog.text


def test_truncated_preprocessed_shard_is_caught_by_its_recorded_size(tmp_path):
    make_tiny_preprocessed(str(tmp_path), seq_len=16, shard_size=8)
    path = tmp_path / "tfrecords" / "train" / "train-00001.tfrecord"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputDataError, match=rf"{path} is truncated"):
        input_fn(_params(tmp_path / "tfrecords" / "train", seq=16, vocab_size=320), modes.TRAIN)


def test_corrupt_record_fails_naming_the_file_or_is_skipped_with_a_count(tmp_path, capfd):
    make_tiny_tfrecords(str(tmp_path), num_examples=10, shard_size=5)
    path = tmp_path / "train-00001.tfrecord"
    data = bytearray(path.read_bytes())
    record = len(data) // 5
    data[2 * record + 30] ^= 0xFF                  # inside the payload of record 2: framing still intact
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{path}: only 2 of 5 records are readable \(checksum mismatch"):
        list(input_fn(_params(tmp_path), modes.TRAIN))
    capfd.readouterr()
    batches = _indices(input_fn(_params(tmp_path, skip_corrupt_records=True), modes.TRAIN))
    assert sum(batches, []) == [0, 1, 2, 3, 4, 5, 6]
    err = capfd.readouterr().err
    assert "skip_corrupt_records: skipped 3 unreadable records" in err and str(path) in err


def test_shard_cut_at_a_record_border_disagrees_with_stats_json(tmp_path, caplog):
    make_tiny_tfrecords(str(tmp_path), num_examples=219, shard_size=50)      # 50, 50, 50, 50, 19
    write_stats_json(tmp_path, [50, 50, 50, 50, 19])
    assert sum(len(b) for b in _indices(input_fn(_params(tmp_path), modes.TRAIN))) == 219
    path = tmp_path / "train-00004.tfrecord"
    cut_at_record_border(path, 12)
    with pytest.raises(InputDataError, match=rf"^{path} holds 12 records \(\d+ bytes\) but "
                                             rf"{tmp_path}/stats.json records 19 \(\d+ bytes\).*"
                                             r"skip_corrupt_records: true"):
        input_fn(_params(tmp_path), modes.TRAIN)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = _indices(input_fn(_params(tmp_path, skip_corrupt_records=True), modes.TRAIN))
    assert sum(len(b) for b in batches) == 212
    assert f"{path} holds 12 records" in caplog.text and "7 records missing" in caplog.text


def test_shard_listed_in_stats_json_but_missing(tmp_path, caplog):
    make_tiny_tfrecords(str(tmp_path), num_examples=24, shard_size=5)        # 5, 5, 5, 5, 4
    write_stats_json(tmp_path, [5, 5, 5, 5, 4])
    (tmp_path / "train-00002.tfrecord").unlink()
    with pytest.raises(InputDataError, match=rf"{tmp_path}/stats.json lists train-00002.tfrecord \(5 records\) "
                                             "but the file is missing"):
        input_fn(_params(tmp_path), modes.TRAIN)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = _indices(input_fn(_params(tmp_path, skip_corrupt_records=True), modes.TRAIN))
    assert sum(len(b) for b in batches) == 19
    assert "train-00002.tfrecord" in caplog.text and "5 records missing" in caplog.text
