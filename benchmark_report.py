"""What a benchmark report adds around the scores: published anchors, the run's exact description, the LLM judge.

* ``published_anchors``: rows of ``data/published_anchors.csv`` (model, benchmark, split, scorer, number, source)
  for one data set — numbers *others* published, printed beside ours and always labelled as theirs.
* ``run_description``: ``--limit`` and subset, the effective generation settings (the bundle's defaults filled in),
  the data files' sha256, the bundle's revision (Hub commit, or a digest of a local folder's files).
* ``apply_llm_judge``: MedEvalKit's optional LLM judge of open answers (VQA_RAD.py ``cal_metrics`` with
  ``use_llm_judge``), sent through this project's OpenAI-compatible backend; never the model under test.
"""

from __future__ import annotations

import csv
from pathlib import Path

from modeling_visual_med_alpaca import InputError, VisualMedAlpacaError

ANCHORS_PATH = Path(__file__).resolve().parent / "data" / "published_anchors.csv"
ANCHOR_COLUMNS = ("model", "benchmark", "dataset", "split", "scorer", "number", "source")
ANCHOR_LABEL = "published by others (not measured here)"


class JudgeError(InputError):
    """The LLM judge is misconfigured, or is the model under test."""


def published_anchors(dataset: str, path: Path = ANCHORS_PATH) -> list[dict]:
    """The shipped anchor rows for ``dataset`` (our ``--dataset`` name), numbers as floats."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(ANCHOR_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path.name} lacks column(s) {', '.join(sorted(missing))}.")
        rows = [dict(row) for row in reader if row["dataset"] == dataset]
    for row in rows:
        row["number"] = float(row["number"])
    return rows


def bundle_revision(vqa, model: str, requested: str | None) -> dict:
    """The bundle's revision: the commit it resolved to on the Hub, else a sha256 of a local folder's files."""
    from vqa_datasets import files_digest

    source = getattr(vqa.model, "_bundle_source", None) or {}
    info = {"requested_revision": requested, "resolved_revision": str(source.get("revision") or "") or None}
    folder = Path(model)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
        info["local_folder_sha256"] = files_digest(files)
    return info


def effective_generation(vqa, max_new_tokens: int | None, task: str) -> dict:
    """What generation actually used: greedy, and the answer (or caption) length with the bundle's default filled in."""
    config = vqa.model.config
    default = config.caption_max_new_tokens if task == "captions" else config.answer_max_new_tokens
    return {
        "do_sample": False,
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else default,
        "max_new_tokens_source": "--max_new_tokens" if max_new_tokens is not None else "bundle default",
        "caption_max_new_tokens": config.caption_max_new_tokens,
    }


# --------------------------------------------------------------------------------------------------
# LLM judge
# --------------------------------------------------------------------------------------------------


def parse_judge(value, model_under_test: str, language_backend=None):
    """The judge's backend config (``None`` when off); refuses the model under test as its own judge."""
    import json

    from language_backends import parse_backend

    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise JudgeError("--judge_backend must be a JSON object (see --help).") from None
    try:
        config = parse_backend(value)
    except VisualMedAlpacaError as error:
        raise JudgeError(f"--judge_backend: {error}") from None
    if config is None:
        raise JudgeError("--judge_backend must name an OpenAI-compatible server; the bundle's own model cannot judge.")
    under_test = {model_under_test, Path(model_under_test).name}
    same_server = language_backend is not None and (language_backend.server, language_backend.model) == (
        config.server,
        config.model,
    )
    if config.model in under_test or same_server:
        raise JudgeError("The judge must not be the model under test: point --judge_backend at another model.")
    return config


def apply_llm_judge(scored: list[dict], config, dataset: str = "vqa_rad", question_key: str = "question") -> dict:
    """MedEvalKit's optional LLM judge (``use_llm_judge``) with its prompt; returns the report's judge section.

    ``overall_accuracy`` is the corrected number: closed questions keep the rule's verdict, open ones take the
    judge's (``<judge>0</judge>`` = correct; a failed call counts wrong). ``overall_accuracy_as_printed`` is what
    the dataset's ``cal_metrics`` prints with the judge on, quirks included:

    * VQA_RAD.py: closed right (rule) + open right (judge): the same as the corrected number;
    * PATH_VQA.py: resets the closed count to 0 and adds only judged open answers, so every closed question
      counts wrong;
    * SLAKE.py: judges *every* question and adds judged-right ones (closed included) to a total that already
      holds the rule's closed right: closed questions can count twice (the share can pass 100%).
    """
    from language_backends import get_backend
    from medevalkit_metrics import cal_metrics_response, judge_prompt, judge_verdict, wilson_interval

    judged = [r for r in scored if dataset == "slake" or r.get("medevalkit", {}).get("group") == "open"]
    backend = get_backend(config)
    replies: list[str | None] = []
    for record in judged:
        prompt = judge_prompt(record[question_key], cal_metrics_response(record["prediction"]), record["answer"])
        try:
            replies.extend(backend.complete([prompt], {"max_new_tokens": 512}))
        except Exception:  # noqa: BLE001 - as the harness: a failed judge call is a wrong answer
            replies.append(None)
    for record, reply in zip(judged, replies, strict=True):
        record["llm_judge_correct"] = judge_verdict(reply)
    closed = [r for r in scored if r.get("medevalkit", {}).get("group") == "close"]
    open_ = [r for r in scored if r.get("medevalkit", {}).get("group") == "open"]
    closed_right = sum(bool(r["medevalkit"]["correct"]) for r in closed)
    open_right = sum(r["llm_judge_correct"] for r in open_)
    n = len(scored)
    if dataset == "pathvqa":
        printed_right = open_right
    elif dataset == "slake":
        printed_right = closed_right + sum(r["llm_judge_correct"] for r in judged)
    else:
        printed_right = closed_right + open_right
    return {
        "judge": config.name,
        "prompt": "MedEvalKit utils.py get_compare_messages",
        "n_judged": len(judged),
        "n_failed_calls": sum(reply is None for reply in replies),
        "open_accuracy": open_right / len(open_) if open_ else None,
        "open_accuracy_ci95": wilson_interval(open_right, len(open_)),
        "overall_accuracy": (closed_right + open_right) / n if n else None,
        "overall_accuracy_ci95": wilson_interval(closed_right + open_right, n),
        "overall_accuracy_as_printed": printed_right / n if n else None,
    }


__all__ = [
    "ANCHOR_LABEL",
    "JudgeError",
    "apply_llm_judge",
    "bundle_revision",
    "effective_generation",
    "parse_judge",
    "published_anchors",
]
