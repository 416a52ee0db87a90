"""MedEvalKit's scoring, reproduced quirk for quirk, with the corrected value beside every quirk that distorts.

The VQA-RAD, SLAKE, PathVQA, PMC-VQA, OmniMedVQA and MMMU-Med numbers of the Lingshu paper (and the tables in
MedEvalKit's README, which also list LLaVA-Med, MedGemma and HuatuoGPT-Vision) come from
alibaba-damo-academy/MedEvalKit at commit 9b12e3b34232a8779cc1275417bf4f72f03d28e0 (``MEDEVALKIT_SOURCE``). Every
function below names the harness function it mirrors. The code was read, not copied; the BLEU and ROUGE numbers come
from the same maintained packages the harness uses (``nltk.translate.bleu_score.sentence_bleu`` of nltk 3.9.1 and
``rouge.Rouge`` of rouge 1.0.1, the versions its requirements.txt pins). Neither needs a download at run time: the
harness tokenises BLEU input with ``str.split(" ")`` (utils.py ``tokenize``) and rouge splits on "." and " ", so
nltk's punkt data is never touched.

``benchmarks/check_medevalkit_agreement.py`` runs the harness's own code beside this module on the same cases
(42,341 comparisons, 0 disagreements).

Quirks reproduced, each with the corrected value beside it in the report (``open.acc_as_printed`` beside
``open.accuracy``, ``open.precision/recall/f1`` beside ``open.token_precision/token_recall/token_f1``, MCQ
``accuracy`` beside ``corrected_accuracy``):

1. utils.py ``calculate_f1`` returns ``(f1, precision, recall)`` but ``judge_open_end_vqa`` unpacks it as
   ``precision, recall, f1``: the harness's "precision" is the F1, its "recall" the precision, its "f1" the recall.
2. The ``cal_metrics`` of VQA_RAD.py / SLAKE.py / PATH_VQA.py put ``acc`` into ``metrics["open"]`` and then divide
   every key of ``metrics["open"]`` except right/total by the open count: the printed open "acc" is
   ``right / n_open / n_open``.
3. VQA_RAD.py and PATH_VQA.py call a question closed when its lower-cased answer *text* is "yes" or "no" (not by
   ``answer_type``); SLAKE.py uses ``answer_type`` but tests ``answer in ["yes", "no"]`` on the raw answer, so its
   capitalised "Yes"/"No" answers go to the exact-match rule ``judge_close_end_vqa`` instead.
4. ``judge_judgement`` (the yes/no rule) is a substring test: "no" is in "not", "normal", "know"; "yes" in "eyes".
5. An open answer whose text is empty after ``parse_response`` (or only periods) makes ``rouge.Rouge.get_scores``
   raise ``ValueError("Hypothesis is empty.")`` and the whole harness run abort; a very long one overflows the
   rouge package's recursive LCS (``RecursionError``). We score such a question (no ROUGE overlap: 0; the answer
   is wrong) and count it in ``n_harness_would_abort``.
6. A set with no open or no closed question makes ``cal_metrics`` divide by zero: we report ``None`` for that group.
7. ``judge_multi_choice`` (PMC-VQA, OmniMedVQA) never says "no answer": an unparsable response is matched to the
   most similar option by ``difflib`` (so an empty response picks option A). The corrected MCQ accuracy counts an
   answer only when ``vqa_metrics.extract_choice`` finds one committed letter.
8. MMMU's ``parse_multi_choice_response`` picks a *random* option when it finds none (``random.choice``, unseeded
   per question): we draw from a generator seeded with the question id, so the number is reproducible; the
   corrected value counts those questions wrong. For MMMU open questions, eval_val.py passes the raw response
   string as ``parsed_pred`` and ``eval_open`` iterates over its *characters*, so no open answer of two or more
   characters can ever be right; the corrected value applies ``eval_open`` to the response and the numbers in it.
"""

from __future__ import annotations

import ast
import difflib
import math
import random
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

MEDEVALKIT_SOURCE = (
    "alibaba-damo-academy/MedEvalKit@9b12e3b34232a8779cc1275417bf4f72f03d28e0: utils/utils.py, "
    "utils/{VQA_RAD,SLAKE,PATH_VQA,PMC_VQA,OmniMedVQA}/*.py (cal_metrics), utils/MMMU/{data_utils,eval_utils}.py"
)
WILSON_Z = 1.959963984540054  # two-sided 95%

# --------------------------------------------------------------------------------------------------
# Response clean-up shared by every dataset
# --------------------------------------------------------------------------------------------------


def extract_boxed_content(text: str) -> str:
    """``mathruler.grader.extract_boxed_content`` (mathruler 0.1.0): the last ``\\boxed{...}``, else "None".

    Re-implemented (12 lines) rather than installed: mathruler imports sympy and pylatexenc at module level
    without declaring them.
    """
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content = text[start + len("\\boxed{") :]
    depth = 0
    for index, char in enumerate(content):
        depth += 1 if char == "{" else -1 if char == "}" else 0
        if depth == -1:
            return content[:index].strip()
    return "None"


def extract_tag(text: str | None, tag: str, hard: bool = True) -> str:
    """utils.py ``extract`` (with ``get_content_between_a_b``): text of every ``<tag>...</tag>``, joined by spaces;
    when there is none, the whole text (``hard``) or ""."""
    if not text:
        return ""
    start_tag, end_tag = f"<{tag}>", f"</{tag}>"
    pieces, start = "", text.find(start_tag)
    while start != -1:
        end = text.find(end_tag, start + len(start_tag))
        if end == -1:
            break
        pieces += text[start + len(start_tag) : end] + " "
        start = text.find(start_tag, end + len(end_tag))
    pieces = pieces.strip()
    return pieces if pieces else (text if hard else "")


def cal_metrics_response(response: str | None) -> str:
    """The first lines of VQA_RAD/SLAKE/PATH_VQA ``cal_metrics``: a ``\\boxed{}`` answer, else an ``<answer>`` one.

    (The harness would crash on a None response; ours records a failed prediction as "".)
    """
    response = response or ""
    boxed = extract_boxed_content(response)
    if boxed != "None":
        return boxed
    if "<answer>" in response:
        return extract_tag(response, "answer")
    return response


_ANSWER_PATTERNS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)


def parse_response(response: str) -> str:
    """utils.py ``parse_response``: lower-case, unwrap boxed/<answer>, keep what follows the last answer phrase."""
    response = response.lower()
    if "boxed" in response:
        response = extract_boxed_content(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    for pattern in _ANSWER_PATTERNS:
        if pattern in response:
            response = response.split(pattern)[-1]
    return response


# --------------------------------------------------------------------------------------------------
# Closed questions
# --------------------------------------------------------------------------------------------------


def judge_judgement(answer: str, response: str) -> bool:
    """utils.py ``judge_judgement``: exactly one of "yes"/"no" occurs as a *substring*, and the answer occurs."""
    answer = answer.lower()
    response = parse_response(response).replace("\n", "").replace(".", "")
    return (("yes" in response) ^ ("no" in response)) and answer in response


def judge_close_end_vqa(answer: str, response: str) -> bool:
    """utils.py ``judge_close_end_vqa``: the parsed response, newlines and periods removed, equals the answer."""
    return parse_response(response).replace("\n", "").replace(".", "") == answer.lower()


# --------------------------------------------------------------------------------------------------
# Open questions
# --------------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """utils.py ``tokenize``: lower-case, a space before each period, split on single spaces."""
    return text.lower().replace(".", " .").split(" ")


def bleu(prediction: str, target: str, n: int) -> float:
    """utils.py ``bleu``: nltk's ``sentence_bleu`` with uniform weights up to n-grams, no smoothing."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        # nltk warns (and returns 0) when a higher-order n-gram has no overlap; the harness prints those warnings.
        warnings.simplefilter("ignore")
        return float(sentence_bleu([tokenize(target)], tokenize(prediction), weights=[1 / n] * n))


def rouge_f(prediction: str, target: str) -> dict[str, float]:
    """utils.py ``rouge``: ``rouge.Rouge().get_scores(pred.lower(), target.lower())`` F-scores (raises as it does)."""
    from rouge import Rouge

    scores = Rouge().get_scores(prediction.lower(), target.lower())[0]
    return {"rouge1": scores["rouge-1"]["f"], "rouge2": scores["rouge-2"]["f"], "rougel": scores["rouge-l"]["f"]}


def calculate_f1(prediction: str, ground_truth: str):
    """utils.py ``calculate_f1``, return values as it returns them: ``(f1, precision, recall)`` on token *sets*,
    ``(0, 0, 0)`` without overlap, and a bare ``0`` when either side has no token (its caller then fails to unpack).
    """
    predicted, reference = set(prediction.lower().split()), set(ground_truth.lower().split())
    if not predicted or not reference:
        return 0
    common = predicted & reference
    precision, recall = len(common) / len(predicted), len(common) / len(reference)
    if precision + recall == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def judge_open_end_vqa(answer: str, response: str) -> dict:
    """utils.py ``judge_open_end_vqa``: the harness's open-question metrics, plus the corrected token scores.

    Returns the harness's keys (``em``, ``bleu1..4``, ``rouge1/2/l``, and ``precision``/``recall``/``f1`` as it
    labels them, i.e. swapped: quirk 1), the correctly labelled ``token_precision``/``token_recall``/``token_f1``,
    and ``harness_error``: the exception that would abort the harness run here (quirk 5), else None.
    """
    answer = answer.lower()
    response = parse_response(response)
    metrics: dict = {f"bleu{n}": bleu(response, answer, n) for n in (1, 2, 3, 4)}
    metrics["em"] = response == answer
    harness_error = None
    try:
        metrics.update(rouge_f(response, answer))
    except (ValueError, RecursionError) as error:
        harness_error = f"{type(error).__name__} in rouge.Rouge.get_scores"
        metrics.update(rouge1=0.0, rouge2=0.0, rougel=0.0)
    returned = calculate_f1(response, answer)
    if not isinstance(returned, tuple):
        harness_error = harness_error or "TypeError unpacking calculate_f1's bare 0"
        returned = (0, 0, 0)
    f1, precision, recall = returned
    # Quirk 1: judge_open_end_vqa writes `precision, recall, f1 = calculate_f1(...)`.
    metrics.update(precision=f1, recall=precision, f1=recall)
    metrics.update(token_precision=precision, token_recall=recall, token_f1=f1)
    metrics["harness_error"] = harness_error
    return metrics


OPEN_SUM_KEYS = ("em", "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougel", "precision", "recall", "f1")
CORRECTED_OPEN_KEYS = ("token_precision", "token_recall", "token_f1")

# --------------------------------------------------------------------------------------------------
# VQA (VQA-RAD, PathVQA, SLAKE): per question, then cal_metrics
# --------------------------------------------------------------------------------------------------


def score_vqa_question(response: str | None, answer: str, answer_type: str, flavour: str) -> dict:
    """One question as the dataset's ``cal_metrics`` scores it.

    ``flavour`` "slake" follows SLAKE.py (closed by ``answer_type``; the yes/no rule only for lower-case
    "yes"/"no" answers, exact match otherwise); any other value follows VQA_RAD.py / PATH_VQA.py (answer and
    response lower-cased and stripped, closed when the answer text is yes/no: quirk 3).
    """
    response = cal_metrics_response(response)
    if flavour == "slake":
        closed = answer_type == "CLOSED"
        if closed:
            rule = "judge_judgement" if answer in ("yes", "no") else "judge_close_end_vqa"
            correct = (
                judge_judgement(answer, response)
                if rule == "judge_judgement"
                else judge_close_end_vqa(answer, response)
            )
            return {"group": "close", "rule": rule, "correct": bool(correct)}
    else:
        answer, response = answer.lower().strip(), response.lower().strip()
        if answer in ("yes", "no"):
            return {"group": "close", "rule": "judge_judgement", "correct": bool(judge_judgement(answer, response))}
    metrics = judge_open_end_vqa(answer, response)
    return {"group": "open", "rule": "judge_open_end_vqa", "correct": bool(metrics["em"]), "open": metrics}


def wilson_interval(right: int, total: int, z: float = WILSON_Z) -> list[float] | None:
    """Wilson score interval for a binomial proportion (95% by default); None for an empty set."""
    if total == 0:
        return None
    share = right / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    # Clamped to [0, 1] and to contain the observed share (rounding can put a bound a hair past it).
    return [max(0.0, min(share, centre - half)), min(1.0, max(share, centre + half))]


def _ratio(right: int, total: int) -> float | None:
    return right / total if total else None


def aggregate_vqa(verdicts: Iterable[Mapping]) -> dict:
    """VQA_RAD/SLAKE/PATH_VQA ``cal_metrics`` over per-question verdicts from ``score_vqa_question``.

    ``overall_accuracy`` is the harness's ``total metrics.acc`` (the number papers print). ``open.acc_as_printed``
    is its doubly divided open "acc" (quirk 2) beside ``open.accuracy``; ``open.precision/recall/f1`` are the
    harness's swapped labels (quirk 1) beside ``open.token_precision/token_recall/token_f1``.
    """
    verdicts = list(verdicts)
    closed = [v for v in verdicts if v["group"] == "close"]
    open_ = [v for v in verdicts if v["group"] == "open"]
    n_open, right_open = len(open_), sum(v["correct"] for v in open_)
    right_closed = sum(v["correct"] for v in closed)
    right = right_open + right_closed
    open_section: dict = {"n": n_open, "right": right_open, "accuracy": _ratio(right_open, n_open)}
    open_section["accuracy_ci95"] = wilson_interval(right_open, n_open)
    # Quirk 2: acc = right / total, then divided by total again with the other open metrics.
    open_section["acc_as_printed"] = right_open / n_open / n_open if n_open else None
    for key in OPEN_SUM_KEYS + CORRECTED_OPEN_KEYS:
        open_section[key] = _ratio(sum(float(v["open"][key]) for v in open_), n_open)
    return {
        "overall_accuracy": _ratio(right, len(verdicts)),
        "overall_accuracy_ci95": wilson_interval(right, len(verdicts)),
        "n": len(verdicts),
        "right": right,
        "close": {
            "n": len(closed),
            "right": right_closed,
            "accuracy": _ratio(right_closed, len(closed)),
            "accuracy_ci95": wilson_interval(right_closed, len(closed)),
        },
        "open": open_section,
        # Quirk 5 / 6: what would stop the harness itself.
        "n_harness_would_abort": sum(1 for v in open_ if v["open"]["harness_error"]),
        "harness_divides_by_zero": n_open == 0 or not closed,
    }


# --------------------------------------------------------------------------------------------------
# Multiple choice: PMC-VQA / OmniMedVQA (utils.py judge_multi_choice) and MMMU (eval_utils.py)
# --------------------------------------------------------------------------------------------------


def find_most_similar_index(choices: Sequence[str], target: str) -> int:
    """utils.py ``find_most_similar_index``: the first choice of highest ``difflib`` ratio (0 when none beats 0)."""
    best_index, best = 0, 0.0
    for index, choice in enumerate(choices):
        similarity = difflib.SequenceMatcher(None, choice, target).ratio()
        if similarity > best:
            best_index, best = index, similarity
    return best_index


def judge_multi_choice(choices: Sequence[str], answer: str, response: str | None) -> bool:
    """utils.py ``judge_multi_choice``: is the response right? (``choices`` exactly as the loader built them.)"""
    response = (response or "").lower()
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    if response.split("\n\n")[0] in alphas:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in alphas:
        response = response.split("\n\n")[-1].split(".")[0]
    response = parse_response(response).strip().lower().replace("\n", "")
    lowered = [choice.lower() for choice in choices]
    split_response = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    # (The harness's `len(split_response) > 300` check sets a flag the branches below overwrite: no effect.)
    if split_response == answer:
        return True
    if split_response in alphas:
        return lowered[ord(split_response) - ord("a")] == answer
    if split_response in lowered:
        return answer in alphas and split_response == lowered[ord(answer) - ord("a")]
    index = find_most_similar_index(lowered, response)
    return alphas[index] == answer or lowered[index] == answer


def mmmu_parse_multi_choice_response(
    response: str | None, all_choices: Sequence[str], index2ans: Mapping[str, str], qid: str
) -> tuple[str, bool]:
    """MMMU eval_utils.py ``parse_multi_choice_response`` (after eval_val.py ``run_model``'s <answer>/boxed unwrap).

    Returns (letter, parsed): ``parsed`` False when the harness fell back to a random pick (quirk 8, drawn here
    from ``random.Random(qid)``).
    """
    response = "" if response is None else response
    # eval_val.py run_model: "<answer>" first, then boxed.
    if "<answer>" in response:
        response = extract_tag(response, "answer")
    if extract_boxed_content(response) != "None":
        response = extract_boxed_content(response)
    # eval_utils.py parse_multi_choice_response repeats the unwrap.
    if "<answer>" in response:
        response = extract_tag(response, "answer")
    elif "\\boxed" in response:
        response = extract_boxed_content(response)
    response = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    index_answer, bracketed, candidates = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            bracketed = True
    if not candidates:
        candidates = [choice for choice in all_choices if f" {choice} " in response]
    if not candidates and len(response.split()) > 5:
        for index, text in index2ans.items():
            if text.lower() in response.lower():
                candidates.append(index)
                index_answer = False
    if not candidates:
        return random.Random(str(qid)).choice(list(all_choices)), False
    if len(candidates) == 1:
        return candidates[0], True
    if index_answer:
        positions = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[positions.index(max(positions))], True


def mmmu_normalize_str(text: str) -> list:
    """MMMU eval_utils.py ``normalize_str``: a number (rounded to 2 places) or the lower-cased string."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (
    r"-?\b\d{1,3}(?:,\d{3})+\b",
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",
)


def mmmu_eval_open(gold: str, predictions: Iterable) -> bool:
    """MMMU eval_utils.py ``eval_open``: a normalised answer string inside a prediction string, or an equal number.

    (MedEvalKit passes the raw response string as ``predictions``: iterating gives its characters; quirk 8.)
    """
    if isinstance(gold, list):
        answers = [normalized for item in gold for normalized in mmmu_normalize_str(item)]
    else:
        answers = mmmu_normalize_str(gold)
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(a, str) and a in prediction for a in answers):
                return True
        elif prediction in answers:
            return True
    return False


def mmmu_corrected_open_predictions(response: str) -> list:
    """Corrected MMMU open parsing (ours): the normalised whole response plus every number found in it."""
    predictions = list(mmmu_normalize_str(response))
    for pattern in _NUMBER_PATTERNS:
        for number in re.findall(pattern, response):
            predictions.extend(mmmu_normalize_str(number))
    return predictions


def mmmu_gold(answer: str):
    """MMMU open answers may be a Python list literal ("['24/7', '3.429']"); the harness compares the string."""
    try:
        value = ast.literal_eval(answer)
    except (ValueError, SyntaxError):
        return answer
    return [str(item) for item in value] if isinstance(value, list) else answer


def aggregate_mcq(verdicts: Iterable[Mapping], groups: Sequence[str] = ()) -> dict:
    """Accuracy as the harness prints it (``medevalkit_correct``) beside the corrected one (``corrected_correct``),
    with Wilson 95% intervals, overall and per value of each field in ``groups`` (question/modality type)."""
    verdicts = list(verdicts)

    def section(items: list[Mapping]) -> dict:
        right = sum(bool(v["medevalkit_correct"]) for v in items)
        corrected = sum(bool(v["corrected_correct"]) for v in items)
        return {
            "n": len(items),
            "accuracy": _ratio(right, len(items)),
            "accuracy_ci95": wilson_interval(right, len(items)),
            "corrected_accuracy": _ratio(corrected, len(items)),
            "corrected_accuracy_ci95": wilson_interval(corrected, len(items)),
            "n_unparsed": sum(1 for v in items if not v.get("parsed", True)),
        }

    report = {"overall": section(verdicts)}
    for field in groups:
        labels = sorted({str(v.get(field)) for v in verdicts if v.get(field) is not None})
        report[f"by_{field}"] = {
            label: section([v for v in verdicts if str(v.get(field)) == label]) for label in labels
        }
    return report


# --------------------------------------------------------------------------------------------------
# LLM judge (MedEvalKit's prompt; off by default)
# --------------------------------------------------------------------------------------------------


def judge_prompt(question: str, response: str, answer: str) -> str:
    """utils.py ``get_compare_messages``: the judge prompt, byte for byte (the reply's <judge>0</judge> = correct)."""
    return f"""
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers (for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, so it is correct.</think>
<judge>0</judge>
    """  # noqa: E501 - the harness's prompt text, kept on its lines


def judge_verdict(reply: str | None) -> bool:
    """VQA_RAD.py ``cal_metrics``: ``extract(result, "judge") == "0"`` means correct (a failed call is wrong)."""
    return extract_tag(reply, "judge") == "0"


__all__ = [
    "MEDEVALKIT_SOURCE",
    "aggregate_mcq",
    "aggregate_vqa",
    "bleu",
    "cal_metrics_response",
    "calculate_f1",
    "extract_boxed_content",
    "extract_tag",
    "judge_close_end_vqa",
    "judge_judgement",
    "judge_multi_choice",
    "judge_open_end_vqa",
    "judge_prompt",
    "judge_verdict",
    "mmmu_corrected_open_predictions",
    "mmmu_eval_open",
    "mmmu_gold",
    "mmmu_parse_multi_choice_response",
    "parse_response",
    "rouge_f",
    "score_vqa_question",
    "tokenize",
    "wilson_interval",
]
