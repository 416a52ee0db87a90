"""Medical VQA metrics, scored the way the field scores them — and, side by side, the way they should be.

LLaVA-Med's published VQA-RAD / SLAKE / PathVQA numbers come from ``llava/eval/run_eval_batch.py`` and
``llava/eval/eval_metrics/{glossary,evaluate_metrics,utils}.py`` in microsoft/LLaVA-Med (commit
ad758b687d4e79628dbfdb149dc545641ed29014). This module re-implements them faithfully, quirks included,
so our numbers are comparable with the papers, and reports stricter metrics next to them:

``llava_med_normalize``
    ``normalize_word(text.lower())`` of glossary.py. Its quirks, reproduced:

    * each punctuation mark in its list is *deleted* when it touches a space anywhere in the text (or when
      the text contains a digit-comma-digit anywhere), otherwise *replaced by a space*:
      ``"left-sided"`` -> ``"left sided"`` but ``"1,000 left-sided"`` -> ``"1000 leftsided"``;
    * periods not followed by a digit are removed, but ``re.UNICODE`` (= 32) is passed where ``count`` goes,
      so at most 32 periods are removed;
    * ``:``, ``'``, ``%``, ``*``, ``&``, ``|`` are not in its list and stay;
    * ``"none"`` becomes ``"0"`` (the number map), articles are dropped, VQA contractions restored.

``llava_med_closed_hit`` (closed-question accuracy as LLaVA-Med reports it)
    1 when the normalised ground truth is a *character substring* of the normalised prediction.
    ``"no"`` is a substring of ``"not"``, ``"normal"``, ``"know"``; a prediction saying both ``"yes, no"``
    is right whatever the truth. (The older ``run_eval.py`` also dropped misses from the denominator when
    the prediction contained "yes" or "no"; ``run_eval_batch.py`` fixed that and is what we follow.)

``llava_med_recall`` (open-question "recall" as LLaVA-Med reports it)
    ``calculate_f1score`` after a *second* normalisation: true positives add the number of times a shared
    token occurs *in the prediction*, false negatives the reference tokens never predicted, and recall is
    ``tp / (tp + fn)``. Repeating a correct token inflates recall: reference ``"left lung"``, prediction
    ``"left left left"`` gives tp = 3, fn = 1, recall 0.75 (a clipped recall gives 0.5). No shared token
    gives 0; an empty prediction gives 0.

Stricter metrics (same normalisation, so only the counting differs):

``strict_closed_hit``
    yes/no ground truth: the prediction's verdict is its first word when that is "yes"/"no", else the one
    of the whole words "yes"/"no" it contains (both or neither: no verdict, wrong). Other closed answers
    ("ct or mri?" -> "mri"): the normalised prediction must equal the normalised ground truth.
``token_recall`` / ``token_f1``
    SQuAD-style bag-of-tokens overlap, each token counted at most as often as it occurs on both sides.
``exact_match``
    normalised prediction equals normalised ground truth.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

# --------------------------------------------------------------------------------------------------
# LLaVA-Med's normalisation (glossary.py), reproduced.
# --------------------------------------------------------------------------------------------------

# VQA contractions as glossary.py lists them. Keys with capitals ("Im", "Ive") never match: the text is
# lower-cased before the lookup (a quirk kept for fidelity).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# glossary.py writes "(?!<=\d)": a negative *lookahead* for the text "<=digit" (meant as a lookbehind), so
# every period not followed by a digit matches.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# glossary.py calls period_strip.sub("", text, re.UNICODE): the flag lands in the ``count`` argument.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def normalize_word(text: str) -> str:
    """glossary.py's ``normalize_word``, behaviour for behaviour (see the module docstring)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            cleaned = cleaned.replace(mark, "")
        else:
            cleaned = cleaned.replace(mark, " ")
    cleaned = _PERIOD.sub("", cleaned, _PERIOD_SUB_COUNT)
    words = [_NUMBER_WORDS.get(word, word) for word in cleaned.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def llava_med_normalize(text: str) -> str:
    """What run_eval_batch.py compares: ``normalize_word(text.lower())``."""
    return normalize_word(text.lower())


def _token_counts(normalized: str) -> Counter:
    # utils.py's split_sentence(s, 1): lower-cased whitespace tokens with their counts.
    return Counter(normalized.lower().split())


# --------------------------------------------------------------------------------------------------
# Per-question metrics
# --------------------------------------------------------------------------------------------------


def llava_med_closed_hit(prediction: str, answer: str) -> float:
    """1.0 when the normalised answer is a substring of the normalised prediction (LLaVA-Med's rule)."""
    return float(llava_med_normalize(answer) in llava_med_normalize(prediction))


def llava_med_precision_recall_f1(prediction: str, answer: str) -> tuple[float, float, float]:
    """``calculate_f1score`` of evaluate_metrics.py on already-normalised text, as run_eval_batch.py calls it.

    Returns ``(precision, recall, f1)``. Shared tokens count with their multiplicity *in the prediction*.
    """
    predicted = _token_counts(normalize_word(llava_med_normalize(prediction)))
    reference = _token_counts(normalize_word(llava_med_normalize(answer)))
    if not predicted or not reference:
        return 0.0, 0.0, 0.0
    true_pos = sum(count for token, count in predicted.items() if token in reference)
    false_pos = sum(count for token, count in predicted.items() if token not in reference)
    false_neg = sum(count for token, count in reference.items() if token not in predicted)
    if true_pos == 0:
        return 0.0, 0.0, 0.0
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    return precision, recall, 2 * precision * recall / (precision + recall)


def llava_med_recall(prediction: str, answer: str) -> float:
    """LLaVA-Med's open-question recall (repeated predicted tokens inflate it; see the module docstring)."""
    return llava_med_precision_recall_f1(prediction, answer)[1]


def _overlap(prediction: str, answer: str) -> tuple[int, int, int]:
    predicted = _token_counts(llava_med_normalize(prediction))
    reference = _token_counts(llava_med_normalize(answer))
    common = sum((predicted & reference).values())
    return common, sum(predicted.values()), sum(reference.values())


def token_recall(prediction: str, answer: str) -> float:
    """Share of the reference tokens found in the prediction, each counted at most as often as it occurs."""
    common, _, reference_len = _overlap(prediction, answer)
    return common / reference_len if reference_len else 0.0


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style token F1 on LLaVA-Med-normalised text (both empty: 1.0; one empty: 0.0)."""
    common, predicted_len, reference_len = _overlap(prediction, answer)
    if predicted_len == 0 or reference_len == 0:
        return float(predicted_len == reference_len)
    if common == 0:
        return 0.0
    precision, recall = common / predicted_len, common / reference_len
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answer: str) -> float:
    return float(llava_med_normalize(prediction) == llava_med_normalize(answer))


def yes_no_verdict(prediction: str) -> str | None:
    """ "yes"/"no" when the prediction commits to one: its first word, else the only one it contains."""
    words = re.findall(r"[a-z]+", llava_med_normalize(prediction))
    if words and words[0] in ("yes", "no"):
        return words[0]
    found = {word for word in words if word in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def strict_closed_hit(prediction: str, answer: str) -> float:
    """Strict closed-question rule: a committed yes/no verdict, or an exact match for other closed answers."""
    truth = llava_med_normalize(answer)
    if truth in ("yes", "no"):
        return float(yes_no_verdict(prediction) == truth)
    return exact_match(prediction, answer)


def score_question(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """Every per-question metric; closed-only and open-only metrics appear only for their type."""
    scores = {"exact_match": exact_match(prediction, answer), "token_f1": token_f1(prediction, answer)}
    if answer_type == "CLOSED":
        scores["llava_med_closed_accuracy"] = llava_med_closed_hit(prediction, answer)
        scores["strict_closed_accuracy"] = strict_closed_hit(prediction, answer)
    else:
        scores["llava_med_open_recall"] = llava_med_recall(prediction, answer)
        scores["token_recall"] = token_recall(prediction, answer)
        # run_eval_batch.py's "open accuracy": the substring rule applied to open questions.
        scores["llava_med_open_substring_hit"] = llava_med_closed_hit(prediction, answer)
    return scores


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------

CLOSED_METRICS = ("llava_med_closed_accuracy", "strict_closed_accuracy", "exact_match", "token_f1")
OPEN_METRICS = ("llava_med_open_recall", "token_recall", "llava_med_open_substring_hit", "exact_match", "token_f1")
OVERALL_METRICS = ("exact_match", "token_f1")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(scored: Iterable[Mapping]) -> dict:
    """Means over records carrying ``answer_type`` and ``scores`` (from ``score_question``)."""
    scored = list(scored)
    closed = [r["scores"] for r in scored if r["answer_type"] == "CLOSED"]
    open_ = [r["scores"] for r in scored if r["answer_type"] != "CLOSED"]
    return {
        "n": len(scored),
        "n_closed": len(closed),
        "n_open": len(open_),
        "closed": {m: _mean([s[m] for s in closed]) for m in CLOSED_METRICS},
        "open": {m: _mean([s[m] for s in open_]) for m in OPEN_METRICS},
        "overall": {m: _mean([r["scores"][m] for r in scored]) for m in OVERALL_METRICS},
    }


def split_labels(value) -> list[str]:
    """Breakdown labels of one question: VQA-RAD writes several types as "ABN, POS"; None means unlabelled."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]


def breakdown(scored: Iterable[Mapping], field: str) -> dict[str, dict]:
    """``aggregate`` per label of ``field``; a question with several labels counts in each."""
    groups: dict[str, list] = {}
    for record in scored:
        for label in split_labels(record.get(field)):
            groups.setdefault(label, []).append(record)
    return {label: aggregate(groups[label]) for label in sorted(groups)}


# --------------------------------------------------------------------------------------------------
# Multiple-choice QA (MedQA style)
# --------------------------------------------------------------------------------------------------


def extract_choice(prediction: str, letters: Iterable[str], options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a free-text answer commits to, or None.

    Tried in order: a leading letter with punctuation ("B", "(B)", "B.", "B)"), an "answer is B" / "answer: B"
    phrase, the one standalone capital option letter ("I pick C"; "A or B" has two and gives None), and the one
    option whose text appears verbatim.
    """
    letters = [letter.upper() for letter in letters]
    alternatives = "|".join(re.escape(letter) for letter in letters)
    text = prediction.strip()
    leading = re.match(rf"^[\(\[]?({alternatives})(?:[\)\].:,]|$)", text)
    if leading:
        return leading.group(1)
    phrase = re.search(rf"answer(?: is)?\s*[:\-]?\s*[\(\[]?({alternatives})\b", text, flags=re.IGNORECASE)
    if phrase:
        return phrase.group(1).upper()
    standalone = set(re.findall(rf"(?<![A-Za-z])({alternatives})(?![A-Za-z])", text))
    if len(standalone) == 1:
        return standalone.pop()
    if options:
        lowered = text.lower()
        found = [letter for letter, option in options.items() if option and option.lower() in lowered]
        if len(found) == 1:
            return found[0].upper()
    return None


__all__ = [
    "CLOSED_METRICS",
    "OPEN_METRICS",
    "aggregate",
    "breakdown",
    "exact_match",
    "extract_choice",
    "llava_med_closed_hit",
    "llava_med_normalize",
    "llava_med_precision_recall_f1",
    "llava_med_recall",
    "normalize_word",
    "score_question",
    "split_labels",
    "strict_closed_hit",
    "token_f1",
    "token_recall",
    "yes_no_verdict",
]
