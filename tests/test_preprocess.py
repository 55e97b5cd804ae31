"""Pile preprocessing: counts against the tokenizer, the packing invariant, determinism, resume, bad input."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import zstandard

from input.errors import InputDataError
from input.packing import StreamPacker
from input.records import encode_varints, serialize_example, varint_offsets
from input.scripts.pile.download import download_pile
from input.scripts.pile.preprocess import main, preprocess
from input.shards import ShardWriter
from tests.data_helpers import make_documents, make_tiny_corpus, make_tiny_tokenizer, write_jsonl, write_jsonl_zst

SEQ = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(str(tmp_path_factory.mktemp("corpus")), num_docs=40)


def _run(corpus_paths, out, tokenizer, **kwargs):
    settings = dict(max_sequence_length=SEQ, shard_size=7, workers=0, progress=False, chunk_bytes=400)
    settings.update(kwargs)
    return preprocess(corpus_paths, str(out), tokenizer, **settings)


def _stream(tokenizer, texts):
    """The EOS-joined token stream, computed straight from the tokenizer."""
    return np.array([t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_id]], dtype=np.int64)


def _records(split_dir):
    """All examples of a split, in shard order, parsed with tf.train.Example."""
    examples = []
    for path in sorted(glob.glob(os.path.join(split_dir, "*.tfrecord"))):
        for raw in tf.data.TFRecordDataset(path):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            examples.append({k: np.array(feature[k].int64_list.value) for k in ("input_ids", "labels", "input_mask")})
    return examples


def _unpack(examples):
    """(input stream, label stream) from the positions whose mask is 1."""
    inputs = np.concatenate([e["input_ids"][e["input_mask"] == 1] for e in examples])
    labels = np.concatenate([e["labels"][e["input_mask"] == 1] for e in examples])
    return inputs, labels


def _shard_bytes(split_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(split_dir, "*.tfrecord")))}


def test_counts_match_the_tokenizer_and_packing_loses_nothing(tmp_path, tokenizer, corpus):
    paths, docs = corpus
    stats = _run(paths, tmp_path, tokenizer)["train"]
    stream = _stream(tokenizer, [text for text, _ in docs])

    assert stats["documents"] == len(docs)
    assert stats["tokens"] == len(stream)
    for subset in {s for _, s in docs}:
        texts = [t for t, s in docs if s == subset]
        assert stats["subsets"][subset] == {"documents": len(texts), "tokens": len(_stream(tokenizer, texts))}

    examples = _records(tmp_path / "train")
    assert len(examples) == stats["examples"] == -(-(len(stream) - 1) // SEQ)
    assert all(len(e[k]) == SEQ for e in examples for k in e)
    inputs, labels = _unpack(examples)
    np.testing.assert_array_equal(inputs, stream[:-1])     # every token an input once, in order
    np.testing.assert_array_equal(labels, stream[1:])      # every token after the first a label once
    for example in examples:                               # labels are inputs shifted by one ...
        np.testing.assert_array_equal(example["labels"][:-1], example["input_ids"][1:])
    for before, after in zip(examples, examples[1:]):      # ... across window borders too
        assert before["labels"][-1] == after["input_ids"][0]
    assert np.count_nonzero(labels == tokenizer.eos_id) == len(docs)   # one EOS after each document

    last = examples[-1]
    real = (len(stream) - 1) - SEQ * (len(examples) - 1)
    np.testing.assert_array_equal(last["input_mask"], np.arange(SEQ) < real)
    assert (last["labels"][real:] == tokenizer.eos_id).all() and (last["input_ids"][real + 1:] == tokenizer.eos_id).all()
    assert stats["padded_tokens"] == SEQ - real
    assert [s["examples"] for s in stats["shards"]] == [7] * (len(examples) // 7) + ([len(examples) % 7] if len(examples) % 7 else [])
    assert [s["file"] for s in stats["shards"]][:2] == ["train-00000.tfrecord", "train-00001.tfrecord"]
    on_disk = json.load(open(tmp_path / "train" / "stats.json"))
    assert on_disk["tokens"] == stats["tokens"] and on_disk["examples"] == stats["examples"]


def test_drop_last_and_subset_filter(tmp_path, tokenizer, corpus):
    paths, docs = corpus
    beta = [t for t, s in docs if s == "Beta"]
    stats = _run(paths, tmp_path, tokenizer, drop_last=True, pile_set_names=["Beta"])["train"]
    stream = _stream(tokenizer, beta)
    assert stats["documents"] == len(beta) and stats["filtered_out"] == len(docs) - len(beta)
    assert stats["examples"] == (len(stream) - 1) // SEQ
    assert stats["dropped_labels"] == (len(stream) - 1) % SEQ and stats["padded_tokens"] == 0
    inputs, labels = _unpack(_records(tmp_path / "train"))
    np.testing.assert_array_equal(labels, stream[1:1 + len(labels)])
    assert len(labels) == stats["examples"] * SEQ


def test_val_fraction_partitions_documents(tmp_path, tokenizer, corpus):
    paths, docs = corpus
    stats = _run(paths, tmp_path, tokenizer, val_fraction=0.3, seed=3)
    texts = [t for t, _ in docs]
    recovered = {}
    for split in ("train", "val"):
        inputs, labels = _unpack(_records(tmp_path / split))
        stream = np.concatenate([inputs[:1], labels])
        ends = np.flatnonzero(stream == tokenizer.eos_id)
        pieces = np.split(stream, ends + 1)[:-1]
        recovered[split] = [tokenizer.decode(p[:-1]) for p in pieces]
        assert stats[split]["documents"] == len(recovered[split]) > 0
    assert sorted(recovered["train"] + recovered["val"]) == sorted(texts)
    for split in ("train", "val"):     # each split keeps the input order
        assert recovered[split] == [t for t in texts if t in set(recovered[split])]
    again = _run(paths, tmp_path / "again", tokenizer, val_fraction=0.3, seed=3)
    assert again["val"]["documents"] == stats["val"]["documents"]
    assert _shard_bytes(tmp_path / "val") == _shard_bytes(tmp_path / "again" / "val")


def test_output_is_deterministic_and_independent_of_workers(tmp_path, tokenizer, corpus):
    paths, _ = corpus
    inline = _run(paths, tmp_path / "a", tokenizer, workers=0)["train"]
    pooled = _run(paths, tmp_path / "b", tokenizer, workers=2)["train"]
    _run(paths, tmp_path / "c", tokenizer, workers=0)
    reference = _shard_bytes(tmp_path / "a" / "train")
    assert reference and _shard_bytes(tmp_path / "b" / "train") == reference
    assert _shard_bytes(tmp_path / "c" / "train") == reference
    assert {k: v for k, v in inline.items()} == pooled


def _interrupt_after(monkeypatch, writes):
    """Make ShardWriter raise KeyboardInterrupt on its `writes`-th record, as a Ctrl-C would."""
    original = ShardWriter.write
    count = {"n": 0}

    def write(self, record):
        count["n"] += 1
        if count["n"] == writes:
            raise KeyboardInterrupt
        return original(self, record)

    monkeypatch.setattr(ShardWriter, "write", write)


def test_resume_after_interrupt_gives_the_same_bytes(tmp_path, tokenizer, corpus, monkeypatch):
    paths, _ = corpus
    subsets = ["Alpha", "unspecified"]        # some records filtered: their count must survive the resume
    reference_stats = _run(paths, tmp_path / "reference", tokenizer, pile_set_names=subsets)["train"]
    assert reference_stats["filtered_out"] > 0
    reference = _shard_bytes(tmp_path / "reference" / "train")
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 60)
        with pytest.raises(KeyboardInterrupt):
            _run(paths, out, tokenizer, pile_set_names=subsets)
    split = out / "train"
    finished = _shard_bytes(split)
    assert 0 < len(finished) < len(reference) and not (split / "stats.json").exists()
    assert not glob.glob(str(split / ".*.tmp"))          # the open shard was cleaned up
    records = [json.load(open(p)) for p in sorted(glob.glob(str(split / ".progress" / "train-*.json")))]
    assert any(r["next"]["token_offset"] > 0 for r in records), "test should cut inside a document"
    (split / ".train-00099.tfrecord.tmp").write_bytes(b"half written")   # as if killed mid-write
    stamps = {name: os.stat(split / name).st_mtime_ns for name in finished}

    stats = _run(paths, out, tokenizer, pile_set_names=subsets)["train"]
    assert _shard_bytes(split) == reference
    assert all(os.stat(split / name).st_mtime_ns == stamp for name, stamp in stamps.items())   # kept, not redone
    assert not glob.glob(str(split / ".*.tmp"))
    assert stats == json.load(open(tmp_path / "reference" / "train" / "stats.json")) | {"settings": stats["settings"]}


def test_rerun_rewrites_missing_or_damaged_shards_only(tmp_path, tokenizer, corpus):
    paths, _ = corpus
    first = _run(paths, tmp_path, tokenizer)["train"]
    split = tmp_path / "train"
    reference = _shard_bytes(split)
    os.unlink(split / "train-00003.tfrecord")
    with open(split / "train-00005.tfrecord", "r+b") as f:
        f.truncate(10)
    stamps = {n: os.stat(split / n).st_mtime_ns for n in ("train-00000.tfrecord", "train-00002.tfrecord")}
    assert _run(paths, tmp_path, tokenizer)["train"] == first
    assert _shard_bytes(split) == reference
    assert all(os.stat(split / n).st_mtime_ns == s for n, s in stamps.items())
    stamps = {n: os.stat(split / n).st_mtime_ns for n in reference}
    _run(paths, tmp_path, tokenizer)                   # complete: nothing is rewritten
    assert all(os.stat(split / n).st_mtime_ns == s for n, s in stamps.items())


def test_other_settings_are_refused_unless_overwrite(tmp_path, tokenizer, corpus):
    paths, _ = corpus
    _run(paths, tmp_path, tokenizer)
    with pytest.raises(InputDataError, match=r"max_sequence_length: 16 then, 32 now.*--overwrite"):
        _run(paths, tmp_path, tokenizer, max_sequence_length=32)
    stats = _run(paths, tmp_path, tokenizer, max_sequence_length=32, overwrite=True)["train"]
    assert len(_records(tmp_path / "train")[0]["input_ids"]) == 32 == stats["settings"]["max_sequence_length"]


def test_bad_inputs_name_the_file(tmp_path, tokenizer):
    docs = make_documents(6)
    good = write_jsonl_zst(str(tmp_path / "good.jsonl.zst"), docs, ["A"] * 6)
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd data at all" * 10)
    truncated = tmp_path / "truncated.jsonl.zst"
    truncated.write_bytes(open(good, "rb").read()[:-9])
    bad_line = tmp_path / "badline.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": broken\n{"meta": {}}\n')
    for path, pattern in [(garbage, "unreadable at the start"), (truncated, "truncated"),
                          (bad_line, "line 2: not a Pile record")]:
        with pytest.raises(InputDataError, match=rf"{path}.*{pattern}.*--skip-bad-files"):
            _run([str(path)], tmp_path / "out", tokenizer, overwrite=True)
    with pytest.raises(InputDataError, match=r"no/such/file.jsonl matches no"):
        _run([str(tmp_path / "no/such/file.jsonl")], tmp_path / "out", tokenizer)

    stats = _run([good, str(garbage), str(bad_line)], tmp_path / "skipping", tokenizer, skip_bad_files=True)["train"]
    assert [b["file"] for b in stats["bad_files"]] == [str(garbage)]
    assert stats["bad_lines"] == 2
    assert stats["documents"] == 6 + 1
    assert stats["tokens"] == len(_stream(tokenizer, docs + ["fine"]))


def test_cli_help_and_run(tmp_path, tokenizer, corpus, capsys):
    result = subprocess.run([sys.executable, "-m", "input.scripts.pile.preprocess", "--help"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0 and "--val-fraction" in result.stdout and "--skip-bad-files" in result.stdout
    paths, docs = corpus
    code = main(["--input", os.path.dirname(paths[0]), "--output-dir", str(tmp_path), "--tokenizer",
                 tokenizer.source, "--max-sequence-length", "16", "--workers", "0", "--no-progress"])
    assert code == 0
    assert f"train: {len(docs)} documents" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path), "--tokenizer",
                 tokenizer.source, "--no-progress"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_download_gathers_local_shards_and_calls_the_hub_for_ids(tmp_path, monkeypatch):
    source = tmp_path / "pile"
    (source / "train").mkdir(parents=True)
    write_jsonl_zst(str(source / "train" / "00.jsonl.zst"), ["a"], ["X"])
    write_jsonl_zst(str(source / "train" / "01.jsonl.zst"), ["b"], ["X"])
    write_jsonl(str(source / "val.jsonl"), ["c"], ["X"])
    files = download_pile(str(source), str(tmp_path / "out"), patterns=["train/00.jsonl.zst", "*.jsonl"])
    assert sorted(os.path.relpath(f, tmp_path / "out") for f in files) == ["train/00.jsonl.zst", "val.jsonl"]
    assert open(files[0], "rb").read() == (source / "train" / "00.jsonl.zst").read_bytes()

    import huggingface_hub
    seen = {}

    def fake_snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        target = os.path.join(kwargs["local_dir"], "train")
        os.makedirs(target, exist_ok=True)
        open(os.path.join(target, "07.jsonl.zst"), "wb").write(zstandard.ZstdCompressor().compress(b"{}\n"))
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    files = download_pile("owner/pile", str(tmp_path / "hub"), patterns=["train/07.jsonl.zst"])
    assert seen["repo_id"] == "owner/pile" and seen["repo_type"] == "dataset"
    assert seen["allow_patterns"] == ["train/07.jsonl.zst"] and files[0].endswith("train/07.jsonl.zst")
    with pytest.raises(InputDataError, match="neither an existing directory nor a hub dataset id"):
        download_pile("./not/here", str(tmp_path / "x"))


def test_lone_surrogates_are_repaired_and_counted(tmp_path, tokenizer):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "x\\ud800y"}\n{"text": "ok \\ud83d\\ude00"}\n{"text": ""}\n')
    stats = _run([str(path)], tmp_path / "out", tokenizer)["train"]
    assert stats["repaired_documents"] == 1 and stats["empty_documents"] == 1
    assert stats["tokens"] == len(_stream(tokenizer, ["x\ufffdy", "ok \U0001F600"]))


def test_progress_records_point_exactly_at_the_next_window(tmp_path, tokenizer, corpus):
    """Each shard's resume record = the stream position after it, checked against an independent count."""
    paths, _ = corpus
    records = []                              # (file index, record index, text, subset), read without our reader
    for file_index, path in enumerate(paths):
        if path.endswith(".txt"):
            records.append((file_index, 0, open(path, encoding="utf-8").read(), "unspecified"))
            continue
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as reader:
            lines = reader.read()
        for record_index, line in enumerate(lines.splitlines()):
            row = json.loads(line)
            records.append((file_index, record_index, row["text"], row["meta"]["pile_set_name"]))
    wanted = {"Alpha", "unspecified"}
    _run(paths, tmp_path, tokenizer, pile_set_names=sorted(wanted))
    progress = sorted(glob.glob(str(tmp_path / "train" / ".progress" / "train-*.json")))
    assert len(progress) > 3
    for shard_index, path in enumerate(progress[:-1]):
        record = json.load(open(path))
        cursor = (record["next"]["file_index"], record["next"]["record_index"])
        before = [r for r in records if r[:2] < cursor]
        kept = [r[2] for r in before if r[3] in wanted]
        assert record["state"]["reader"]["filtered_out"] == sum(r[3] not in wanted for r in before)
        assert record["state"]["input"]["documents"] == len(kept)
        tokens_before = len(_stream(tokenizer, kept))
        assert record["state"]["input"]["tokens"] == tokens_before
        assert tokens_before + record["next"]["token_offset"] == (shard_index + 1) * 7 * SEQ   # next window start


def test_example_encoding_parses_back_with_tensorflow():
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2 ** 21, 2 ** 35, 2 ** 62, 50399], dtype=np.int64)
    serialized = serialize_example(values, values[::-1], np.arange(len(values)) % 2)
    feature = tf.train.Example.FromString(serialized).features.feature
    assert list(feature["input_ids"].int64_list.value) == values.tolist()
    assert list(feature["labels"].int64_list.value) == values[::-1].tolist()
    assert list(feature["input_mask"].int64_list.value) == (np.arange(len(values)) % 2).tolist()
    encoded, offsets = encode_varints(values)
    assert offsets[-1] == len(encoded) and np.diff(offsets).tolist() == [1, 1, 1, 2, 2, 2, 3, 4, 6, 9, 3]
    np.testing.assert_array_equal(varint_offsets(encoded), offsets)


@pytest.mark.parametrize("seq_len", [1, 3, 8])
@pytest.mark.parametrize("batched", [False, True])
def test_stream_packer_windows_overlap_by_one_and_report_where_the_next_starts(seq_len, batched):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 50, size=rng.integers(1, 20)) for _ in range(30)]
    packer, windows = StreamPacker(seq_len, pad_id=0), []
    if batched:      # documents fed in random groups, as preprocessing feeds a tokenized batch
        cuts = np.unique(np.r_[0, rng.integers(0, len(docs), size=8), len(docs)])
        for a, b in zip(cuts[:-1], cuts[1:]):
            tokens = np.concatenate(docs[a:b])
            varints, offsets = encode_varints(np.r_[7, tokens, 300])    # offsets need not start at 0
            windows += packer.add_documents(tokens, [len(d) for d in docs[a:b]], list(range(a, b)),
                                            (varints, offsets[1:-1]))
    else:
        for index, doc in enumerate(docs):
            windows += packer.add(doc, tag=index)
    final = packer.finish()
    stream = np.concatenate(docs)
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    for k, window in enumerate(windows):
        np.testing.assert_array_equal(window.input_ids, stream[k * seq_len:(k + 1) * seq_len])
        np.testing.assert_array_equal(window.labels, stream[k * seq_len + 1:(k + 1) * seq_len + 1])
        doc, offset = window.next_start
        assert starts[doc] + offset == (k + 1) * seq_len and offset < len(docs[doc])
        assert encode_varints(window.input_ids)[0].tobytes() == window.payloads[0]
    rest = stream[len(windows) * seq_len:]
    if len(rest) >= 2:
        assert final.num_real == len(rest) - 1 and final.next_start is None
        np.testing.assert_array_equal(final.input_ids[:len(rest)], rest)
        assert (final.labels[final.num_real:] == 0).all()
    else:
        assert final is None


@pytest.mark.parametrize("workers, seq_len, drop_last", [(2, SEQ, False), (0, 5, True)])
def test_shards_equal_a_reference_encoding_and_packing(tmp_path, tokenizer, corpus, workers, seq_len, drop_last):
    """Byte for byte, the shards are TFRecord files of protobuf-made Examples of the plain packing of
    one-document-at-a-time `encode` (batches of ~300 bytes split the corpus at many places)."""
    paths, docs = corpus
    stats = _run(paths, tmp_path / "out", tokenizer, workers=workers, max_sequence_length=seq_len,
                 drop_last=drop_last, chunk_bytes=300)["train"]
    stream = _stream(tokenizer, [text for text, _ in docs])
    records = []
    for start in range(0, len(stream) - 1, seq_len):          # window k: stream[k S : k S + S + 1]
        window = stream[start:start + seq_len + 1]
        real = len(window) - 1
        if real < seq_len and drop_last:
            break
        window = np.r_[window, np.full(seq_len + 1 - len(window), tokenizer.eos_id)]
        features = {"input_ids": window[:-1], "labels": window[1:], "input_mask": np.arange(seq_len) < real}
        example = tf.train.Example(features=tf.train.Features(feature={
            name: tf.train.Feature(int64_list=tf.train.Int64List(value=values.astype(np.int64)))
            for name, values in features.items()}))
        records.append(example.SerializeToString(deterministic=True))    # deterministic: map keys sorted
    reference = tmp_path / "reference"
    reference.mkdir()
    for shard, first in enumerate(range(0, len(records), 7)):
        with tf.io.TFRecordWriter(str(reference / f"train-{shard:05d}.tfrecord")) as writer:
            for record in records[first:first + 7]:
                writer.write(record)
    assert stats["examples"] == len(records) > 14
    assert _shard_bytes(tmp_path / "out" / "train") == _shard_bytes(reference)


@pytest.mark.parametrize("case", ["empty_file", "blank_lines", "other_subsets", "drop_last_short"])
def test_input_without_an_example_is_an_error_that_writes_nothing(tmp_path, tokenizer, capsys, case):
    path, extra = tmp_path / "input.jsonl", []
    if case == "empty_file":
        path = tmp_path / "input.txt"
        path.write_text("")
    elif case == "blank_lines":
        path.write_text('\n\n{"text": ""}\n')
    elif case == "other_subsets":
        write_jsonl(str(path), make_documents(3), ["A"] * 3)
        extra = ["--pile-set-name", "B"]
    else:
        write_jsonl(str(path), ["short"], ["A"])
        extra = ["--drop-last"]
    out = tmp_path / "out"
    argv = ["--input", str(path), "--output-dir", str(out), "--tokenizer", tokenizer.source,
            "--max-sequence-length", "16", "--workers", "0", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: no example for split train") and "--allow-empty" in err
    assert err.count("\n") == 1
    assert not out.exists()                      # nothing left behind
    assert main(argv + ["--allow-empty"]) == 0
    assert json.loads((out / "train" / "stats.json").read_text())["examples"] == 0
    assert f"0 examples in 0 shards, 0 padded tokens; written to {out / 'train'}" in capsys.readouterr().out


def test_empty_val_split_is_an_error_naming_it(tmp_path, tokenizer):
    docs = make_documents(3)
    path = write_jsonl(str(tmp_path / "input.jsonl"), docs, ["A"] * 3)
    with pytest.raises(InputDataError, match=r"no example for split val: all 3 documents went to the other split \(--val-fraction"):
        _run([path], tmp_path / "out", tokenizer, val_fraction=1e-9)
    assert not (tmp_path / "out" / "val").exists()
    assert json.loads((tmp_path / "out" / "train" / "stats.json").read_text())["examples"] > 0
