"""Loaders for the medical VQA benchmarks as researchers download them today (Hugging Face layouts).

Each layout is taken from its dataset card and from MedEvalKit's own loader (alibaba-damo-academy/MedEvalKit@9b12e3b,
``utils/<DATASET>/<DATASET>.py`` ``load_data``/``construct_messages``), which produced the Lingshu / MedGemma /
HuatuoGPT-Vision numbers in ``data/published_anchors.csv``:

* ``flaviagiammarino/vqa-rad``: ``data/<split>-*.parquet`` with ``image`` (``{"bytes", "path"}``), ``question``,
  ``answer``; MedEvalKit evaluates ``split="test"`` (451 questions). No answer type: a yes/no answer is closed,
  as in VQA_RAD.py ``cal_metrics``. The question id is the row index.
* ``BoKelvin/SLAKE``: ``test.json`` + ``imgs/`` (``evaluate_vqa.load_slake``; MedEvalKit keeps every ``q_lang``:
  use ``--language all`` for its set).
* PMC-VQA: ``test_clean.csv`` (``Figure_path, Question, Answer, Choice A..D, Answer_label``) or MedEvalKit's
  ``test_2.csv`` (``index, Figure_path, Caption, Question, Choice A..D, Answer, split``; PMC_VQA.py ``load_data``),
  images in ``figures/`` (or ``images/``) beside the file. The choices keep their ``A:`` prefixes for the
  harness's judgement; the prompt shows them without.
* OmniMedVQA: the release folder; every ``QA_information/Open-access/*.json`` (lists of ``question_id,
  question_type, modality_type, question, gt_answer, image_path, option_A..D``), ``image_path`` relative to the
  folder. MedEvalKit reads the files in ``os.listdir`` order; we sort them so runs are reproducible.
* MMMU (``MMMU/MMMU``): ``<Subject>/<split>-*.parquet`` of the five "Health and Medicine" subjects
  (data_utils.py ``DOMAIN_CAT2SUB_CAT``) with ``id, question, options`` (a Python list literal), ``answer``,
  ``question_type`` and ``image_1..image_7``. The answers of ``test`` are not public: use ``--split validation``.
  **Several images**: the pipeline answers about one image, and so does MedEvalKit: data_utils.py
  ``process_single_sample`` passes ``image_1`` only (and no image when more than one option is itself an image).
  We do the same and record each question's image count (``n_images``) so the report can say how many questions
  referred to images the model never saw.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

from evaluate_vqa import DatasetFormatError, Example, _answer_type, _arrow_image_bytes, _read_json, _require

MMMU_MEDICAL_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
LETTERS = "ABCDEFGHIJ"
_CHOICE_PREFIX = re.compile(r"^\s*([A-J])\s*[:.)]\s*")


def _read_parquet(files: list[Path], columns: set[str], what: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table([str(p) for p in files] if len(files) > 1 else str(files[0]))
    except (pa.ArrowInvalid, OSError):
        raise DatasetFormatError(f"{what}: a file is not a readable parquet file.") from None
    missing = columns - set(table.column_names)
    if missing:
        raise DatasetFormatError(f"{what} lacks column(s) {', '.join(sorted(missing))}; check --dataset.")
    return table


def _parquet_files(path: Path, split: str, what: str) -> list[Path]:
    files = [path] if path.suffix == ".parquet" else sorted(path.glob(f"**/{split}-*.parquet"))
    if not files or not all(p.is_file() for p in files):
        raise DatasetFormatError(
            f"No {what} parquet data for split '{split}' at the given --data_path: pass a parquet file or a folder "
            f"holding <split>-*.parquet (e.g. data/{split}-00000-of-00001.parquet)."
        )
    return files


def load_vqa_rad_parquet(data_path: str | Path, split: str = "test") -> list[Example]:
    """``flaviagiammarino/vqa-rad`` parquet (a file or the dataset folder); closed = yes/no answer text."""
    table = _read_parquet(_parquet_files(Path(data_path), split, "VQA-RAD"), {"image", "question", "answer"}, "VQA-RAD")
    images = table.column("image")
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    return [
        Example(
            qid=str(index),
            question=str(questions[index]),
            answer=str(answers[index]),
            answer_type=_answer_type(None, str(answers[index])),
            image=_arrow_image_bytes(images, index),
        )
        for index in range(table.num_rows)
    ]


def _choice_text(choice: str) -> str:
    return _CHOICE_PREFIX.sub("", choice, count=1).strip()


def load_pmc_vqa(data_path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """PMC-VQA ``test_clean.csv`` or ``test_2.csv`` (see the module docstring); four choices, one answer letter."""
    path = Path(data_path)
    if path.is_dir():
        found = [path / name for name in ("test_clean.csv", "test_2.csv") if (path / name).is_file()]
        if not found:
            raise DatasetFormatError("No test_clean.csv or test_2.csv in the given PMC-VQA folder.")
        path = found[0]
    if not path.is_file():
        raise DatasetFormatError("The PMC-VQA CSV was not found at the given --data_path.")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        needed = {"Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D"}
        label = "Answer_label" if "Answer_label" in columns else "Answer"
        missing = (needed | {label}) - columns
        if missing:
            raise DatasetFormatError(
                f"The PMC-VQA CSV lacks column(s) {', '.join(sorted(missing))} (expected test_clean.csv or test_2.csv)."
            )
        rows = list(reader)
    if image_root:
        root = Path(image_root)
    else:
        root = next((path.parent / name for name in ("figures", "images") if (path.parent / name).is_dir()), None)
        root = root or path.parent / "figures"
    examples = []
    for index, row in enumerate(rows):
        choices = [row[f"Choice {letter}"] for letter in "ABCD"]
        answer = str(row[label]).strip().upper()
        if answer not in ("A", "B", "C", "D"):
            raise DatasetFormatError(f"PMC-VQA row {index}: the answer column '{label}' is not a letter A-D.")
        examples.append(
            Example(
                qid=str(row.get("index") or index),
                question=row["Question"].strip(),
                answer=answer,
                image=str(root / row["Figure_path"]),
                options={letter: _choice_text(choice) for letter, choice in zip("ABCD", choices, strict=True)},
                extra={"harness_choices": choices, "harness_answer": answer},
            )
        )
    return examples


def load_omnimedvqa(data_path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """OmniMedVQA open-access questions (see the module docstring); the answer letter is the option equal to
    ``gt_answer`` (OmniMedVQA.py ``construct_messages``)."""
    root = Path(data_path)
    folder = root / "QA_information" / "Open-access"
    if not folder.is_dir():
        raise DatasetFormatError(
            "No QA_information/Open-access folder under the given --data_path: pass the OmniMedVQA release folder."
        )
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DatasetFormatError("QA_information/Open-access holds no .json question files.")
    image_base = Path(image_root) if image_root else root
    examples = []
    for file in files:
        records = _read_json(file, "An OmniMedVQA question file")
        _require(records, ("question", "gt_answer", "image_path", "option_A", "option_B"), "OmniMedVQA questions")
        for index, record in enumerate(records):
            letters = [letter for letter in "ABCD" if f"option_{letter}" in record]
            options = {letter: str(record[f"option_{letter}"]) for letter in letters}
            # The harness's loop: the last option whose text equals gt_answer gives the letter, else the text stays.
            answer = str(record["gt_answer"])
            for letter in letters:
                if record[f"option_{letter}"] == record["gt_answer"]:
                    answer = letter
            examples.append(
                Example(
                    qid=str(record.get("question_id", f"{file.stem}:{index}")),
                    question=str(record["question"]),
                    answer=answer,
                    question_type=record.get("question_type"),
                    image=str(image_base / record["image_path"]),
                    options=options,
                    extra={
                        "harness_choices": [f"{letter}. {options[letter]}" for letter in letters],
                        "harness_answer": answer,
                        "modality": record.get("modality_type"),
                        "source_dataset": record.get("dataset"),
                    },
                )
            )
    return examples


def _mmmu_options(value, qid: str) -> list[str]:
    try:
        options = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list):
        raise DatasetFormatError(f"MMMU question {qid}: 'options' is not a list literal.")
    return [str(option) for option in options]


def load_mmmu(data_path: str | Path, split: str = "validation", subjects=MMMU_MEDICAL_SUBJECTS) -> list[Example]:
    """MMMU parquet of the Health-and-Medicine subjects (see the module docstring for the image policy)."""
    path = Path(data_path)
    if path.suffix == ".parquet":
        files = [path]
    else:
        files = [f for subject in subjects for f in sorted((path / subject).glob(f"{split}-*.parquet"))]
        if not files and path.is_dir():
            files = sorted(path.glob(f"{split}-*.parquet"))  # a single subject's folder
    if not files or not all(f.is_file() for f in files):
        raise DatasetFormatError(
            f"No MMMU parquet data for split '{split}' at the given --data_path: pass the MMMU folder (holding "
            f"<Subject>/{split}-*.parquet for the Health-and-Medicine subjects), one subject's folder, or a parquet "
            "file."
        )
    columns = {"id", "question", "options", "answer", "question_type", "image_1"}
    examples = []
    for file in files:
        table = _read_parquet([file], columns, "MMMU")
        image_columns = [f"image_{k}" for k in range(1, 8) if f"image_{k}" in table.column_names]
        rows = table.drop_columns(image_columns).to_pylist()
        first_images = table.column("image_1")
        for index, row in enumerate(rows):
            qid = str(row["id"])
            options = _mmmu_options(row["options"], qid)
            n_images = sum(table.column(name)[index].is_valid for name in image_columns)
            option_images = sum(len(re.findall(r"<img='(.*?)'>", option)) for option in options)
            kind = str(row["question_type"])
            answer = str(row["answer"])
            if kind == "multiple-choice":
                if answer not in LETTERS[: len(options)]:
                    raise DatasetFormatError(
                        f"MMMU question {qid}: the answer is not an option letter (the test split's answers are not "
                        "public: use --split validation)."
                    )
                option_map = {LETTERS[i]: option for i, option in enumerate(options)}
            else:
                option_map = None
            # data_utils.py process_single_sample: image_1, or no image when several options are images.
            has_image = option_images <= 1 and first_images[index].is_valid
            examples.append(
                Example(
                    qid=qid,
                    question=str(row["question"]),
                    answer=answer,
                    question_type=kind,
                    image=_arrow_image_bytes(first_images, index) if has_image else None,
                    options=option_map,
                    extra={"subject": mmmu_subject(qid), "n_images": n_images},
                )
            )
    return examples


def mmmu_subject(qid: str) -> str | None:
    """``validation_Clinical_Medicine_12`` -> ``Clinical_Medicine``."""
    match = re.fullmatch(r"(?:dev|validation|test)_(.+)_\d+", qid)
    return match.group(1) if match else None


def data_files(dataset: str, data_path: str | Path, split: str) -> list[Path]:
    """The files whose digest identifies the data a run read (question files, not image folders)."""
    path = Path(data_path)
    if path.is_file():
        return [path]
    patterns = {
        "slake": ["test.json"],
        "vqa_rad": ["questions.json", f"**/{split}-*.parquet"],
        "pathvqa": [f"**/{split}-*.parquet", "**/*.arrow", "**/state.json"],
        "pmc_vqa": ["test_clean.csv", "test_2.csv"],
        "omnimedvqa": ["QA_information/Open-access/*.json"],
        "mmmu_med": [f"{s}/{split}-*.parquet" for s in MMMU_MEDICAL_SUBJECTS] + [f"{split}-*.parquet"],
    }.get(dataset, [])
    return sorted({file for pattern in patterns for file in path.glob(pattern) if file.is_file()})


def files_digest(files: list[Path]) -> str | None:
    """sha256 over the files' names and contents (streamed, in the given order), or None when there are none."""
    import hashlib

    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(json.dumps(file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


__all__ = [
    "MMMU_MEDICAL_SUBJECTS",
    "data_files",
    "files_digest",
    "load_mmmu",
    "load_omnimedvqa",
    "load_pmc_vqa",
    "load_vqa_rad_parquet",
    "mmmu_subject",
]
