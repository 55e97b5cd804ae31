"""The local Pile-format corpus: content, limits, determinism, and that preprocessing reads it."""
import os

import pytest

from input.readers import expand_inputs, read_documents
from input.scripts.make_local_corpus import main, make_local_corpus
from input.scripts.pile.preprocess import preprocess
from tests.data_helpers import make_tiny_tokenizer


def _source_tree(root):
    files = {
        "pkg/__init__.py": "",                                   # empty: skipped
        "pkg/alpha.py": "def alpha():\n    return 'α'\n",
        "pkg/beta.py": "BETA = 2\n" * 50,
        "docs/guide.rst": "Guide\n=====\n\nSome words.\n",
        "README.md": "# readme\n",
        "site-packages/third_party.py": "x = 1\n",               # not the stdlib: skipped
        "pkg/__pycache__/alpha.txt": "cache\n",                  # skipped
        "data/blob.bin": "binary\n",                             # other suffix: skipped
    }
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(root, "pkg", "latin1.py"), "wb") as f:
        f.write("café = 1\n".encode("latin-1"))                 # not UTF-8: skipped
    return files


def _read(directory):
    return [(d.text, d.subset) for d in read_documents(expand_inputs([str(directory)]))]


def test_gathers_utf8_text_files_as_pile_records(tmp_path):
    files = _source_tree(tmp_path / "src")
    summary = make_local_corpus(str(tmp_path / "out"), sources=[str(tmp_path / "src")], max_mb=1)
    docs = _read(tmp_path / "out")
    expected = {(files[k], "PythonStdlib") for k in ("pkg/alpha.py", "pkg/beta.py")} | \
               {(files[k], "PythonStdlibDocs") for k in ("docs/guide.rst", "README.md")}
    assert set(docs) == expected and len(docs) == summary["documents"] == 4
    assert summary["text_bytes"] == sum(len(t.encode()) for t, _ in docs)


def test_limits_shards_and_is_deterministic(tmp_path):
    _source_tree(tmp_path / "src")
    kwargs = dict(sources=[str(tmp_path / "src")], max_mb=0.0005, shard_mb=0.00003, seed=1)
    first = make_local_corpus(str(tmp_path / "a"), **kwargs)
    second = make_local_corpus(str(tmp_path / "b"), **kwargs)
    assert 0 < first["text_bytes"] <= 500 and first["documents"] < 4
    assert len(first["files"]) >= 2                                  # tiny shard limit: several shards
    for a, b in zip(first["files"], second["files"], strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    whole = [_read(make_local_corpus(str(tmp_path / f"s{seed}"), sources=kwargs["sources"], max_mb=1,
                                     seed=seed)["files"][0]) for seed in (1, 2)]
    assert sorted(whole[0]) == sorted(whole[1]) and whole[0] != whole[1]       # the seed only orders files


def test_stdlib_corpus_runs_through_preprocessing(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "corpus"), "--max-mb", "0.1"]) == 0
    assert "wrote" in capsys.readouterr().out
    docs = _read(tmp_path / "corpus")
    assert docs and {s for _, s in docs} <= {"PythonStdlib", "PythonStdlibDocs"}
    tokenizer = make_tiny_tokenizer(str(tmp_path / "tokenizer"))
    stats = preprocess([str(tmp_path / "corpus")], str(tmp_path / "tfrecords"), tokenizer, max_sequence_length=64,
                       workers=0, progress=False)["train"]
    assert stats["documents"] == len(docs)
    assert stats["tokens"] == sum(len(tokenizer.encode(t)) + 1 for t, _ in docs)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="source directory .*nope does not exist"):
        make_local_corpus(str(tmp_path / "out"), sources=[str(tmp_path / "nope")])
