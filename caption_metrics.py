"""Captioning metrics for Med-GIT: BLEU-4, ROUGE-L and CIDEr-D, offline.

The scorers are the reference implementations of the COCO caption evaluation (``pycocoevalcap``),
the toolkit GIT and most captioning papers report with, so numbers are comparable with the
literature. They are pure Python; only coco-caption's PTB tokenizer (and METEOR/SPICE) need Java,
so captions are tokenised here instead: lower-cased word tokens, punctuation dropped, hyphenated
words and contractions kept whole ("x-ray", "patient's") — what the PTB tokenizer step does for
the captions this project sees. ``evaluate.load`` is not used: it fetches metric code from the Hub.

Scales are coco-caption's own: ``bleu4`` and ``rouge_l`` in [0, 1]; ``cider`` (CIDEr-D) from 0 to 10,
where papers print it multiplied by 100. CIDEr weights n-grams by their rarity across the
*references of the evaluated set*: score a whole validation set at once, not one caption at a time.

    from caption_metrics import score_captions
    score_captions(["ct of the chest"], [["Chest CT."]])  # {"bleu4": ..., "rouge_l": ..., "cider": ...}
"""

from __future__ import annotations

import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_WORD = re.compile(r"\w+(?:[-']\w+)*")


def tokenize_caption(caption: str) -> str:
    """Lower-case word tokens joined by single spaces, the form the coco-caption scorers expect."""
    return " ".join(_WORD.findall(caption.lower()))


def score_captions(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4, mean ROUGE-L and mean CIDEr-D of ``predictions`` against their ``references``.

    ``references[i]`` holds one or more reference captions for ``predictions[i]``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists: pass one each.")
    if not predictions:
        raise ValueError("No captions to score: pass at least one prediction with its references.")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("Each entry of references must be a non-empty list of reference captions.")
    candidates = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    golds = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(golds, candidates, verbose=0)
    rouge_l, _ = Rouge().compute_score(golds, candidates)
    cider, _ = Cider().compute_score(golds, candidates)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge_l), "cider": float(cider)}


__all__ = ["score_captions", "tokenize_caption"]
