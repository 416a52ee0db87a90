"""Med-Alpaca instruction data: load, validate, turn into prompt/completion pairs, and build the shipped sample.

The record contract is the original's (``med_alpaca_data_clean.json``): ``{"instruction", "input", "output"}``,
multiple-choice options in ``input``. Files may be a JSON list or JSON Lines; a folder or Hub dataset with those
columns works too. Each kept record becomes ``{"prompt", "completion"}`` with the training template imported from
``modeling_visual_med_alpaca`` (the one place the templates live), so TRL's ``SFTTrainer`` puts the loss on the
answer only.

Rebuild the sample shipped in ``data/`` (real VQA-RAD questions and ROCO captions)::

    python med_alpaca_data.py build-sample data/med_alpaca_sample.jsonl

Check a data file without training::

    python med_alpaca_data.py validate med_alpaca_data_clean.json --tokenizer path/or/hub-id --max_length 512
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from modeling_visual_med_alpaca import InputError, build_training_prompt

REPO_ROOT = Path(__file__).resolve().parent
SAMPLE_PATH = REPO_ROOT / "data" / "med_alpaca_sample.jsonl"
VQA_RAD_QUESTIONS = REPO_ROOT / "data" / "vqa_rad_dev" / "questions.json"
ROCO_CAPTIONS_CSV = REPO_ROOT / "data" / "roco" / "roco_val_captions.csv"

RECORD_FIELDS = ("instruction", "input", "output")
# Why a record is dropped, in the order the checks run (the first failing check is the one counted).
DROP_REASONS = (
    "not_a_record",
    "missing_field",
    "non_string_field",
    "empty_instruction",
    "empty_output",
    "duplicate",
    "completion_cut_by_max_length",
)


class TrainingDataError(InputError):
    """The instruction data cannot be used for training (unreadable, wrong shape, or too many bad records)."""


@dataclass
class ValidationReport:
    """What validation kept and dropped. Counts only: record contents never reach a log or an error."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def dropped_share(self) -> float:
        return self.dropped_total / self.total if self.total else 0.0

    def summary(self) -> str:
        lines = [f"Instruction data: {self.total} records, {self.kept} kept, {self.dropped_total} dropped"]
        lines += [f"  {reason:<30} {self.dropped[reason]:>7}" for reason in DROP_REASONS if self.dropped[reason]]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_instruction_records(dataset_name: str, split: str = "train") -> list:
    """Raw records of a JSON list / JSON Lines file, or of a local folder / Hub dataset with the record columns.

    Files are read with ``json`` (not ``datasets``) so that a non-string field is seen as such and counted by
    validation instead of being coerced or failing the whole Arrow conversion.
    """
    path = Path(dataset_name)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None
        if records is None or not isinstance(records, list):
            records = []
            for line_number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise TrainingDataError(
                        f"{path.name} is neither a JSON list nor JSON Lines (line {line_number} is not valid JSON: "
                        f"{error.msg}). Provide a list of {{instruction, input, output}} records."
                    ) from None
        return records

    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_name, split=split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise TrainingDataError(
            f"Could not load the dataset {dataset_name!r} (split {split!r}): {type(error).__name__}. Pass a JSON/JSONL "
            "file path, a local dataset folder, or a Hub dataset id reachable from this machine."
        ) from None
    missing = [name for name in ("instruction", "output") if name not in dataset.column_names]
    if missing:
        raise TrainingDataError(
            f"The dataset {dataset_name!r} lacks the column(s) {missing}; Med-Alpaca records need "
            "instruction, input (optional) and output."
        )
    return dataset.to_list()


# --------------------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------------------


def _record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return "not_a_record"
    if "instruction" not in record or "output" not in record:
        return "missing_field"
    # A missing or null input means "no input" (as in the original data); any other non-string is broken.
    input_text = record.get("input") if record.get("input") is not None else ""
    if not all(isinstance(value, str) for value in (record["instruction"], input_text, record["output"])):
        return "non_string_field"
    if not record["instruction"].strip():
        return "empty_instruction"
    if not record["output"].strip():
        return "empty_output"
    return None


def validate_instruction_records(
    records: list, tokenizer=None, max_length: int | None = None, max_dropped_share: float = 0.05
) -> tuple[list[dict], ValidationReport]:
    """Drop and count unusable records; fail when more than ``max_dropped_share`` of them are dropped.

    With a tokenizer and ``max_length``, a record whose prompt alone fills ``max_length`` tokens is dropped: its
    completion would be cut entirely, leaving a sequence with no trainable token (SFTTrainer truncates the end).
    Returns the kept records as ``{"instruction", "input", "output"}`` with ``input`` always a string.
    """
    report = ValidationReport(total=len(records))
    seen: set[tuple[str, str, str]] = set()
    candidates: list[dict] = []
    for record in records:
        problem = _record_problem(record)
        if problem is None:
            clean = {
                "instruction": record["instruction"],
                "input": record.get("input") or "",
                "output": record["output"],
            }
            key = (clean["instruction"], clean["input"], clean["output"])
            if key in seen:
                problem = "duplicate"
            else:
                seen.add(key)
                candidates.append(clean)
        if problem is not None:
            report.dropped[problem] += 1

    kept = candidates
    if tokenizer is not None and max_length is not None and candidates:
        prompts = [build_training_prompt(r["instruction"], r["input"]) for r in candidates]
        prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        kept = [r for r, length in zip(candidates, prompt_lengths, strict=True) if length < max_length]
        report.dropped["completion_cut_by_max_length"] += len(candidates) - len(kept)

    report.kept = len(kept)
    if report.total == 0 or report.kept == 0 or report.dropped_share > max_dropped_share:
        raise TrainingDataError(
            f"{report.dropped_total} of {report.total} records would be dropped ({report.dropped_share:.1%}), more "
            f"than the allowed {max_dropped_share:.1%}.\n{report.summary()}\nFix the data, raise --max_length, or "
            "raise --max_dropped_share if dropping them is intended."
        )
    return kept, report


def to_prompt_completion(record: dict) -> dict:
    """One validated record as SFTTrainer's prompt-completion pair (the training template of DESIGN.md §2)."""
    return {"prompt": build_training_prompt(record["instruction"], record["input"]), "completion": record["output"]}


# --------------------------------------------------------------------------------------------------
# The shipped sample, built from the repository's real data
# --------------------------------------------------------------------------------------------------

# Modality words of ROCO captions, mapped to the answer the sample teaches; captions naming exactly one are used.
_MODALITY_PATTERNS = {
    "Computed tomography (CT)": r"\b(ct|computed tomography)\b",
    "Magnetic resonance imaging (MRI)": r"\b(mri|mr|magnetic resonance)\b",
    "Ultrasound": r"\b(ultrasound|ultrasonography|sonography|sonogram)\b",
    "Plain radiograph (X-ray)": r"\b(x-ray|radiograph|radiography)\b",
    "Angiography": r"\b(angiography|angiogram)\b",
}


def _roco_captions() -> list[str]:
    with ROCO_CAPTIONS_CSV.open(newline="", encoding="utf-8") as handle:
        return [row["caption"].strip() for row in csv.DictReader(handle) if row["caption"].strip()]


def build_sample_records(roco_records: int = 240, seed: int = 0) -> list[dict]:
    """Instruction records in the original format from real data shipped in ``data/``.

    - every VQA-RAD question: closed (yes/no) questions carry their options in ``input`` like the
      multiple-choice records of the original data; open questions have an empty ``input``;
    - ROCO captions naming exactly one imaging modality: "which modality?" with the caption as ``input``;
    - ROCO captions as answers to "write a caption" instructions, which gives long completions.
    """
    rng = random.Random(seed)
    records = []
    for question in json.loads(VQA_RAD_QUESTIONS.read_text(encoding="utf-8")):
        answer = str(question["answer"]).strip()
        closed = question["answer_type"] == "CLOSED" and answer.lower() in {"yes", "no"}
        records.append(
            {
                "instruction": question["question"].strip(),
                "input": "Options: yes, no" if closed else "",
                "output": answer,
            }
        )
    captions = _roco_captions()
    rng.shuffle(captions)
    modality_records, caption_records = [], []
    for caption in captions:
        matches = [name for name, pattern in _MODALITY_PATTERNS.items() if re.search(pattern, caption, re.IGNORECASE)]
        if len(matches) == 1 and len(modality_records) < roco_records // 2:
            modality_records.append(
                {
                    "instruction": "Which imaging modality produced the radiology image this caption describes?",
                    "input": caption,
                    "output": matches[0],
                }
            )
        elif len(matches) == 1 and len(caption_records) < roco_records // 2:
            caption_records.append(
                {
                    "instruction": f"Write a figure caption for a radiology image. Modality: {matches[0]}.",
                    "input": "",
                    "output": caption,
                }
            )
        if len(modality_records) + len(caption_records) >= roco_records:
            break
    records += modality_records + caption_records
    # VQA-RAD repeats a few question/answer pairs (different images): the sample keeps one of each.
    records = list({(r["instruction"], r["input"], r["output"]): r for r in records}.values())
    rng.shuffle(records)
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-sample", help="write the sample built from data/ as JSON Lines")
    build.add_argument("output", nargs="?", default=str(SAMPLE_PATH))
    build.add_argument("--roco_records", type=int, default=240)
    check = commands.add_parser("validate", help="print the validation summary of a data file or dataset")
    check.add_argument("dataset_name")
    check.add_argument("--split", default="train")
    check.add_argument("--tokenizer", default=None)
    check.add_argument("--max_length", type=int, default=512)
    check.add_argument("--max_dropped_share", type=float, default=0.05)
    args = parser.parse_args()

    if args.command == "build-sample":
        records = build_sample_records(roco_records=args.roco_records)
        print(f"Wrote {len(records)} records to {write_jsonl(records, Path(args.output))}")
        return
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        _, report = validate_instruction_records(
            load_instruction_records(args.dataset_name, args.split),
            tokenizer,
            args.max_length if tokenizer else None,
            args.max_dropped_share,
        )
    except TrainingDataError as error:
        raise SystemExit(f"error: {error}") from None
    print(report.summary())


if __name__ == "__main__":
    main()
