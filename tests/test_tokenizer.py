"""GPT-2 byte-level BPE: loading paths, parity with an independent reference BPE, vocab padding."""
import json
import os

import pytest

from input.errors import InputDataError
from input.tokenizer import EOS_TOKEN, load_tokenizer
from tests.data_helpers import SAMPLE_TEXT, make_tiny_tokenizer

regex = pytest.importorskip("regex")

TEXTS = [
    "Hello world",
    "def add(a, b):\n    return a + b\n\n\n",
    "  leading spaces, trailing   ",
    "they're here, we'll see; it's 12345 or 3.14159!",
    "café naïve 東京 🙂\ttabs\r\nand CRLF",
    SAMPLE_TEXT,
    "",
]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (printables map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBpe:
    """A plain-Python GPT-2 BPE encoder written from the algorithm, as the test oracle."""

    SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, directory):
        with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
        self.rank = {tuple(line.split(" ")): i for i, line in enumerate(lines)}
        self.alphabet = _byte_alphabet()

    def _merge(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, _ = min(pairs)
            if best == float("inf"):
                break
            pair = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for k, piece in enumerate(text.split(EOS_TOKEN)):
            if k:
                ids.append(self.vocab[EOS_TOKEN])
            for word in self.SPLIT.findall(piece):
                mapped = "".join(self.alphabet[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self._merge(mapped))
        return ids


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    make_tiny_tokenizer(directory)
    return directory


def test_encoding_matches_reference_bpe(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    reference = ReferenceBpe(tokenizer_dir)
    for text in TEXTS + [f"a{EOS_TOKEN}b {EOS_TOKEN}"]:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.encode_batch(TEXTS) == [reference.encode(t) for t in TEXTS]


def test_all_load_paths_agree_and_eos_is_the_endoftext_id(tokenizer_dir, tmp_path):
    only_files = tmp_path / "gpt2_files"
    only_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (only_files / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    loaded = [load_tokenizer(tokenizer_dir), load_tokenizer(os.path.join(tokenizer_dir, "tokenizer.json")),
              load_tokenizer(str(only_files)), load_tokenizer(str(only_files / "vocab.json"))]
    vocab = json.load(open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8"))
    for tokenizer in loaded:
        assert tokenizer.eos_id == vocab[EOS_TOKEN]
        assert tokenizer.vocab_size == len(vocab)
        assert [tokenizer.encode(t) for t in TEXTS] == [loaded[0].encode(t) for t in TEXTS]
        assert tokenizer.encode(f"x{EOS_TOKEN}") == tokenizer.encode("x") + [tokenizer.eos_id]


def test_decode_round_trips(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_is_deterministic(tmp_path):
    first, second = make_tiny_tokenizer(str(tmp_path / "a")), make_tiny_tokenizer(str(tmp_path / "b"))
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.fingerprint == second.fingerprint


def test_padded_model_vocab_ids_have_no_text(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer.encode("hello world")
    padding_row = tokenizer.vocab_size + 5          # like GPT-J's rows 50257..50399
    with pytest.raises(InputDataError, match=f"token id {padding_row} is outside the tokenizer vocab"):
        tokenizer.decode(ids + [padding_row])
    assert tokenizer.decode(ids + [padding_row], skip_unknown=True) == "hello world"
    tokenizer.check_fits_model(tokenizer.vocab_size + 100)
    with pytest.raises(InputDataError, match=r"model.vocab_size=10; set model.vocab_size to at least"):
        tokenizer.check_fits_model(10)


def test_hub_id_is_fetched_with_hf_hub_download(tokenizer_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append((repo_id, filename, revision))
        if filename == "tokenizer.json":
            raise EntryNotFoundError("no tokenizer.json in this repo")
        return os.path.join(tokenizer_dir, filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tokenizer = load_tokenizer("EleutherAI/gpt-j-6b", revision="main")
    assert [c[1] for c in calls] == ["tokenizer.json", "vocab.json", "merges.txt"]
    assert calls[0][0] == "EleutherAI/gpt-j-6b" and calls[0][2] == "main"
    assert tokenizer.encode("hello") == load_tokenizer(tokenizer_dir).encode("hello")


def test_hub_failure_and_missing_paths_are_clear(tokenizer_dir, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    load_tokenizer(tokenizer_dir)      # a local directory never calls the hub
    with pytest.raises(InputDataError, match=r"hub repo 'owner/missing'.*pass a local directory"):
        load_tokenizer("owner/missing")
    with pytest.raises(InputDataError, match=r"'\./no/such/dir' is neither an existing file/directory"):
        load_tokenizer("./no/such/dir")
    with pytest.raises(InputDataError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(os.path.dirname(tokenizer_dir))
