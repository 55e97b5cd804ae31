"""Make a cnn_eval.json-format file of invented news articles at MLPerf's lengths (no download).

    python -m bench.mlperf.make_dataset --out cnn_eval_invented.json --samples 8 --tokenizer TOK \
        [--min-tokens 600] [--max-tokens 1900] [--seed 0] [--model-vocab 50400]

The words are random syllables: a vocabulary of invented words whose frequencies fall off as
word frequencies in text do (Zipf), some capitalised as names. Each article's length is drawn
uniformly from [--min-tokens, --max-tokens] and met by measuring its MLPerf prompt (the Alpaca
template over the article, bench/mlperf/dataset.py) with --tokenizer, so every prompt lands in
the range and, below 1,919, is never cut. Each reference ("output") is 3-4 highlights, one per
line: shortened copies of the article's early sentences, as CNN/DailyMail's highlights mostly
are. The tokenizer's ids must fit the model's embedding (--model-vocab, GPT-J's 50,400): a GPT-2
BPE does, and so does the small tokenizer the random 6B-shaped checkpoint is run with.
"""
from __future__ import annotations

import json
import sys
from typing import Callable, Sequence

import numpy as np

from bench.mlperf.dataset import INSTRUCTION, PROMPT_TEMPLATE
from config.cli import ArgumentParser
from config.files import atomic_write_text

GPTJ_VOCAB = 50400
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr", "kl",
          "sh", "th", ""]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "", "n", "r", "s", "l", "m", "k", "nd", "st"]


class DatasetSpecError(ValueError):
    """The requested range or tokenizer cannot make the asked-for articles."""


def invented_vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """`size` distinct invented words of 1-4 syllables, shorter ones first (frequent words are short)."""
    words: dict[str, None] = {}
    while len(words) < size:
        syllables = int(rng.choice([1, 2, 2, 3, 3, 4]))
        words.setdefault("".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                                 for _ in range(syllables)))
    return sorted(words, key=len)


class WordSource:
    """Draws words with Zipf frequencies (rank k has weight 1 / (k + 2.7), Mandelbrot's fit to
    English); one word in twelve is a name from a capitalised list of its own."""

    def __init__(self, rng: np.random.Generator, vocabulary: Sequence[str], names: Sequence[str]):
        self.rng, self.vocabulary, self.names = rng, list(vocabulary), list(names)
        weights = 1.0 / (np.arange(len(self.vocabulary)) + 2.7)
        self.cumulative = np.cumsum(weights / weights.sum())

    def word(self) -> str:
        if self.rng.random() < 1 / 12:
            return self.names[int(self.rng.integers(len(self.names)))]
        index = int(np.searchsorted(self.cumulative, self.rng.random()))
        return self.vocabulary[min(index, len(self.vocabulary) - 1)]

    def sentence(self) -> list[str]:
        """8-32 words, the first capitalised, a comma now and then; the period is added on output."""
        words = [self.word() for _ in range(int(self.rng.integers(8, 33)))]
        words[0] = words[0][:1].upper() + words[0][1:]
        for i in range(3, len(words) - 2, int(self.rng.integers(5, 10))):
            words[i] += ","
        return words


def article_text(sentences: Sequence[Sequence[str]], words: int) -> str:
    """The first `words` words of the sentences, each sentence (the last one cut short too) ending
    with a period."""
    out, left = [], words
    for sentence in sentences:
        if left <= 0:
            break
        part = list(sentence[:left])
        part[-1] = part[-1].rstrip(",")
        out.append(" ".join(part) + ".")
        left -= len(part)
    return " ".join(out)


def prompt_tokens(count_tokens: Callable[[str], int], article: str) -> int:
    """Tokens of MLPerf's prompt over `article` (before the 1,919-token cut)."""
    return count_tokens(PROMPT_TEMPLATE.format(instruction=INSTRUCTION, input=article))


def fit_article(sentences: Sequence[Sequence[str]], count_tokens: Callable[[str], int], target: int,
                low: int, high: int) -> tuple[str, int, int]:
    """(article, its prompt's tokens, its words) with the fewest words whose prompt reaches `target` tokens,
    one word fewer if that overshoots `high`; found by bisection over the word count (the prompt's
    tokens never fall as words are added). Raises DatasetSpecError when no word count lands in
    [low, high] (a range narrower than one word's tokens)."""
    total = sum(len(s) for s in sentences)
    if prompt_tokens(count_tokens, article_text(sentences, total)) < target:
        raise DatasetSpecError(f"{total} words make fewer than {target} prompt tokens; this is a bug in the "
                               "sentence supply (bench.mlperf.make_dataset.make_sample)")
    lo, hi = 1, total                        # the answer is in [lo, hi]
    while lo < hi:
        middle = (lo + hi) // 2
        if prompt_tokens(count_tokens, article_text(sentences, middle)) >= target:
            hi = middle
        else:
            lo = middle + 1
    for words in (lo, lo - 1):
        text = article_text(sentences, words)
        tokens = prompt_tokens(count_tokens, text)
        if low <= tokens <= high:
            return text, tokens, words
    raise DatasetSpecError(f"no article has a prompt of {low}-{high} tokens with this tokenizer (one word "
                           f"adds more tokens than the range is wide); widen --min-tokens/--max-tokens")


def highlights(rng: np.random.Generator, sentences: Sequence[Sequence[str]], words: int) -> str:
    """3-4 shortened copies (6-14 words, commas dropped) of the article's first eight sentences
    (those within its `words` words), one per line."""
    whole = max(1, sum(1 for end in np.cumsum([len(s) for s in sentences]) if end <= words))
    count = int(rng.integers(3, 5))
    chosen = sorted(rng.choice(min(8, whole), size=min(count, whole), replace=False))
    lines = []
    for index in chosen:
        words = [w.rstrip(",") for w in sentences[index][:int(rng.integers(6, 15))]]
        lines.append(" ".join(words) + ".")
    return "\n".join(lines)


def make_sample(rng: np.random.Generator, source: WordSource, count_tokens: Callable[[str], int], low: int,
                high: int) -> tuple[dict, int]:
    """({"instruction", "input", "output"}, prompt tokens) of one invented article."""
    target = int(rng.integers(low, high + 1))
    sentences: list[list[str]] = []
    while prompt_tokens(count_tokens, article_text(sentences, sum(map(len, sentences)))) < target:
        sentences.extend(source.sentence() for _ in range(8))
    article, tokens, words = fit_article(sentences, count_tokens, target, low, high)
    return {"instruction": INSTRUCTION, "input": article, "output": highlights(rng, sentences, words)}, tokens


def make_records(count: int, count_tokens: Callable[[str], int], low: int, high: int, seed: int = 0,
                 vocabulary_size: int = 6000) -> tuple[list[dict], list[int]]:
    """`count` samples in cnn_eval.json's format and each one's prompt tokens."""
    rng = np.random.default_rng(seed)
    words = invented_vocabulary(rng, vocabulary_size + 300)
    names = [w[:1].upper() + w[1:] for w in words[-300:]]
    source = WordSource(rng, words[:vocabulary_size], names)
    records, lengths = [], []
    for _ in range(count):
        record, tokens = make_sample(rng, source, count_tokens, low, high)
        records.append(record)
        lengths.append(tokens)
    return records, lengths


def check_range(low: int, high: int, template_tokens: int) -> None:
    if low > high:
        raise DatasetSpecError(f"--min-tokens {low} exceeds --max-tokens {high}; give min <= max")
    if low <= template_tokens:
        raise DatasetSpecError(f"--min-tokens {low} leaves no room for an article: MLPerf's prompt template "
                               f"alone is {template_tokens} tokens with this tokenizer; give more")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.mlperf.make_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write (cnn_eval.json's format)")
    parser.add_argument("--samples", type=int, required=True, help="articles to make")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory/file that measures the prompts")
    parser.add_argument("--min-tokens", type=int, default=600, help="shortest prompt, in tokens (template included)")
    parser.add_argument("--max-tokens", type=int, default=1900,
                        help="longest prompt, in tokens (MLPerf cuts prompts at 1,919)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the words, lengths and highlights")
    parser.add_argument("--model-vocab", type=int, default=GPTJ_VOCAB,
                        help="embedding rows of the model the file is for: the tokenizer must fit them")
    args = parser.parse_args(argv)
    from input.tokenizer import load_tokenizer
    try:
        if args.samples < 1:
            raise DatasetSpecError(f"--samples {args.samples} must be at least 1")
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.check_fits_model(args.model_vocab, "--model-vocab")
        check_range(args.min_tokens, args.max_tokens, prompt_tokens(lambda t: len(tokenizer.encode(t)), ""))
        records, lengths = make_records(args.samples, lambda t: len(tokenizer.encode(t)), args.min_tokens,
                                        args.max_tokens, args.seed)
    except (DatasetSpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, json.dumps(records, indent=1) + "\n")
    print(f"wrote {len(records)} invented articles to {args.out}: prompts {min(lengths)}-{max(lengths)} tokens "
          f"(mean {np.mean(lengths):.0f}) by {tokenizer.source} ({tokenizer.vocab_size} ids)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
