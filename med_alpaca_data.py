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
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from modeling_visual_med_alpaca import InputError, ModelLoadError, build_training_prompt

REPO_ROOT = Path(__file__).resolve().parent
SAMPLE_PATH = REPO_ROOT / "data" / "med_alpaca_sample.jsonl"
VQA_RAD_QUESTIONS = REPO_ROOT / "data" / "vqa_rad_dev" / "questions.json"
ROCO_CAPTIONS_CSV = REPO_ROOT / "data" / "roco" / "roco_val_captions.csv"

RECORD_FIELDS = ("instruction", "input", "output")
# Why a record is dropped, in the order the checks run (the first failing check is the one counted).
DROP_REASONS = (
    "invalid_json",
    "not_a_record",
    "missing_field",
    "non_string_field",
    "empty_instruction",
    "empty_output",
    "duplicate",
    "completion_cut_by_max_length",
)


# What to do about each problem, shown beside the field and the lines it was found on.
ADVICE = {
    "invalid_json": "each line must be one JSON object (JSON Lines): fix or remove the line",
    "not_a_record": "each record must be a JSON object with instruction, input and output",
    "missing_field": "add the field: instruction and output are required (input may be left out)",
    "non_string_field": "the field must be a string: join a list into one string; a missing or null input means none",
    "empty_instruction": "write the instruction, or remove the record",
    "empty_output": "write the answer the model should learn, or remove the record",
    "duplicate": "an exact repeat of an earlier record (instruction, input and output): remove the repeat",
    "completion_cut_by_max_length": "the prompt alone fills --max_length tokens, leaving no room for the answer: "
    "raise --max_length or shorten the instruction/input",
}
LOCATIONS_SHOWN = 10


class TrainingDataError(InputError):
    """The instruction data cannot be used for training (unreadable, wrong shape, or too many bad records)."""


class _InvalidJSONLine:
    """Stands in for a JSON Lines line that does not parse, so validation counts it like any other bad record."""


@dataclass
class ValidationReport:
    """What validation kept and dropped: counts, field names and locations (line numbers) only — record contents
    never reach a log or an error."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    # (reason, field or None) -> where: "line 12", "record 3", "row 7" (+ " (repeats line 2)" for duplicates)
    problems: dict = field(default_factory=dict)

    def add(self, reason: str, field_name: str | None, location: str) -> None:
        self.dropped[reason] += 1
        self.problems.setdefault((reason, field_name), []).append(location)

    def problem_lines(self) -> list[str]:
        """One line per problem: what, which field, how many, where, and what to do."""
        order = {reason: index for index, reason in enumerate(DROP_REASONS)}
        lines = []
        for (reason, field_name), locations in sorted(self.problems.items(), key=lambda item: order[item[0][0]]):
            shown = ", ".join(locations[:LOCATIONS_SHOWN])
            more = f" and {len(locations) - LOCATIONS_SHOWN} more" if len(locations) > LOCATIONS_SHOWN else ""
            what = f"{reason} (field {field_name!r})" if field_name else reason
            lines.append(f"  {what}: {len(locations)} at {shown}{more} -> {ADVICE[reason]}")
        return lines

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def dropped_share(self) -> float:
        return self.dropped_total / self.total if self.total else 0.0

    def summary(self) -> str:
        lines = [f"Instruction data: {self.total} records, {self.kept} kept, {self.dropped_total} dropped"]
        return "\n".join(lines + self.problem_lines())


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _json_list_with_lines(text: str) -> tuple[list, list[str]]:
    """The elements of a JSON list and the line each starts on (json.JSONDecoder.raw_decode, element by element)."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, 0).end()
    if text[position : position + 1] != "[":
        raise json.JSONDecodeError("Expecting '['", text, position)
    position = whitespace.match(text, position + 1).end()
    records, lines, line, counted_to = [], [], 1, 0
    while text[position : position + 1] != "]":
        line += text.count("\n", counted_to, position)
        counted_to = position
        record, position = decoder.raw_decode(text, position)
        records.append(record)
        lines.append(f"line {line}")
        position = whitespace.match(text, position).end()
        if text[position : position + 1] == ",":
            position = whitespace.match(text, position + 1).end()
        elif text[position : position + 1] != "]":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
    if text[position + 1 :].strip():
        raise json.JSONDecodeError("Extra data", text, position + 1)
    return records, lines


def read_instruction_records(dataset_name: str, split: str = "train") -> tuple[list, list[str]]:
    """Raw records and where each came from (``"line 12"``; ``"row 7"`` of a dataset).

    A JSON list (each record at the line it starts on), JSON Lines (a line that does not parse becomes a bad record
    of its own), or a local folder / Hub dataset with the record columns. Files are read with ``json`` (not
    ``datasets``) so that a non-string field is seen as such and counted by validation instead of being coerced or
    failing the whole Arrow conversion.
    """
    path = Path(dataset_name)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                return _json_list_with_lines(text)
            except json.JSONDecodeError as error:
                line = text.count("\n", 0, error.pos) + 1
                raise TrainingDataError(
                    f"{path.name} starts like a JSON list but is not valid JSON (line {line}: {error.msg}). Fix the "
                    "file: a list of {instruction, input, output} records, or one record per line (JSON Lines)."
                ) from None
        records, locations = [], []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(_InvalidJSONLine())
            locations.append(f"line {line_number}")
        return records, locations

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
    return dataset.to_list(), [f"row {index}" for index in range(1, len(dataset) + 1)]


def load_instruction_records(dataset_name: str, split: str = "train") -> list:
    """Raw records of a JSON list / JSON Lines file, or of a local folder / Hub dataset with the record columns."""
    return read_instruction_records(dataset_name, split)[0]


# --------------------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------------------


def _record_problem(record) -> tuple[str, str | None] | None:
    """``(reason, field)`` of the first check the record fails, ``None`` if it is usable."""
    if isinstance(record, _InvalidJSONLine):
        return "invalid_json", None
    if not isinstance(record, dict):
        return "not_a_record", None
    for name in ("instruction", "output"):
        if name not in record:
            return "missing_field", name
    # A missing or null input means "no input" (as in the original data); any other non-string is broken.
    values = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
    for name in RECORD_FIELDS:
        if not isinstance(values[name], str):
            return "non_string_field", name
    if not values["instruction"].strip():
        return "empty_instruction", "instruction"
    if not values["output"].strip():
        return "empty_output", "output"
    return None


def validate_instruction_records(
    records: list,
    tokenizer=None,
    max_length: int | None = None,
    max_dropped_share: float = 0.05,
    locations: list[str] | None = None,
) -> tuple[list[dict], ValidationReport]:
    """Drop unusable records and report each problem with its field and locations; fail when more than
    ``max_dropped_share`` of them are dropped.

    ``locations`` say where each record came from (``read_instruction_records``); without them, ``record N``. With a
    tokenizer and ``max_length``, a record whose prompt alone fills ``max_length`` tokens is dropped: its completion
    would be cut entirely, leaving a sequence with no trainable token (SFTTrainer truncates the end). Returns the kept
    records as ``{"instruction", "input", "output"}`` with ``input`` always a string.
    """
    locations = locations or [f"record {index}" for index in range(1, len(records) + 1)]
    report = ValidationReport(total=len(records))
    first_seen: dict[tuple[str, str, str], str] = {}
    candidates: list[tuple[dict, str]] = []
    for record, location in zip(records, locations, strict=True):
        problem = _record_problem(record)
        if problem is not None:
            report.add(*problem, location)
            continue
        clean = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
        key = (clean["instruction"], clean["input"], clean["output"])
        if key in first_seen:
            report.add("duplicate", None, f"{location} (repeats {first_seen[key]})")
        else:
            first_seen[key] = location
            candidates.append((clean, location))

    kept = [clean for clean, _ in candidates]
    if tokenizer is not None and max_length is not None and candidates:
        prompts = [build_training_prompt(r["instruction"], r["input"]) for r, _ in candidates]
        prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        kept = []
        for (clean, location), length in zip(candidates, prompt_lengths, strict=True):
            if length < max_length:
                kept.append(clean)
            else:
                report.add("completion_cut_by_max_length", None, f"{location} ({length} prompt tokens)")

    report.kept = len(kept)
    if report.total == 0 or report.kept == 0 or report.dropped_share > max_dropped_share:
        raise TrainingDataError(
            f"{report.dropped_total} of {report.total} records would be dropped ({report.dropped_share:.1%}), more "
            f"than the allowed {max_dropped_share:.1%}.\n{report.summary()}\nFix the data as advised above, or raise "
            "--max_dropped_share if dropping them is intended."
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


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)

    if args.command == "build-sample":
        records = build_sample_records(roco_records=args.roco_records)
        print(f"Wrote {len(records)} records to {write_jsonl(records, Path(args.output))}")
        return
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as error:
            print(f"error: could not load the tokenizer --tokenizer ({type(error).__name__}).", file=sys.stderr)
            raise SystemExit(ModelLoadError.exit_code) from None
    try:
        records, locations = read_instruction_records(args.dataset_name, args.split)
        _, report = validate_instruction_records(
            records, tokenizer, args.max_length if tokenizer else None, args.max_dropped_share, locations
        )
    except TrainingDataError as error:  # the exit code train_sft.py gives the same data (InputError: 2)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    print(report.summary())


if __name__ == "__main__":
    main()
