"""Evaluate a Visual Med-Alpaca bundle on medical VQA, captioning and multiple-choice QA.

Research use only: the scores describe a research model and say nothing about clinical fitness.

Single process (CPU or one GPU)::

    python evaluate_vqa.py --model org/visual-med-alpaca --dataset vqa_rad \
        --data_path data/vqa_rad_dev/questions.json --output_dir eval/vqa_rad

Several processes (accelerate splits the questions; one GPU each, or CPU processes)::

    accelerate launch --multi_gpu --num_processes 4 evaluate_vqa.py --model ... --dataset slake --data_path test.json
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 evaluate_vqa.py --model ... (CPU)

(``accelerate launch --cpu --num_processes 2`` silently runs ONE process: use the line above on CPU.)

Other datasets (``--config recipe.yaml`` holding the same keys works too)::

    --dataset slake   --data_path Slake1.0/test.json               # English only; --language all keeps every language
    --dataset pathvqa --data_path pvqa/qas/test/test_qa.pkl         # official release (images in pvqa/images/test/)
    --dataset pathvqa --data_path path-vqa/data --split test        # HF flaviagiammarino/path-vqa parquet files
    --dataset pathvqa --data_path path_vqa_saved --split test       # the same after datasets' save_to_disk
    --dataset jsonl   --data_path my_set.jsonl                      # {"image", "question", "answer", "answer_type"}
    --dataset medqa   --data_path medqa_test.jsonl                  # text-only MCQ: question, options, answer letter
    --dataset roco    --data_path roco_val.csv --image_root images  # Med-GIT captions: BLEU-4, ROUGE-L, CIDEr

The field's current suite, laid out as downloaded from the Hugging Face Hub (see vqa_datasets.py), scored by the
``llava_med``, ``strict`` and ``medevalkit`` families side by side (medevalkit_metrics.py)::

    --dataset vqa_rad    --data_path vqa-rad                 # flaviagiammarino/vqa-rad: data/test-*.parquet (451)
    --dataset slake      --data_path SLAKE --language all    # BoKelvin/SLAKE: test.json + imgs/ (MedEvalKit: all langs)
    --dataset pathvqa    --data_path path-vqa                # flaviagiammarino/path-vqa parquet
    --dataset pmc_vqa    --data_path PMC-VQA/test_clean.csv  # or MedEvalKit's test_2.csv; figures/ beside it
    --dataset omnimedvqa --data_path OmniMedVQA              # QA_information/Open-access/*.json + Images/
    --dataset mmmu_med   --data_path MMMU --split validation # the five Health-and-Medicine subjects' parquet
    --judge_backend '{"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge", "api": "chat"}'

Predictions are appended to ``OUTPUT_DIR/predictions/rank-K.jsonl`` as each batch finishes; a killed run
started again with the same arguments skips every question already answered (a torn last line is
dropped and redone). At the end the main process writes ``predictions.jsonl`` (dataset order, with
per-question scores), ``report.json``, ``report.md`` and ``report.png``. Metrics: see ``vqa_metrics.py``
and the README's "Evaluation" section.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeling_visual_med_alpaca import DISCLAIMER, InputError, VisualMedAlpacaError
from vqa_metrics import (
    aggregate,
    breakdown,
    extract_choice,
    llava_med_normalize,
    score_question,
)

DATASETS = ("vqa_rad", "slake", "pathvqa", "jsonl", "medqa", "roco", "pmc_vqa", "omnimedvqa", "mmmu_med")
VQA_DATASETS = ("vqa_rad", "slake", "pathvqa", "jsonl")
# Image (and text) multiple choice; scored by extract_choice and, for the MedEvalKit tasks, by its rules too.
MCQ_DATASETS = ("medqa", "pmc_vqa", "omnimedvqa", "mmmu_med")
LLAVA_MED_SOURCE = (
    "microsoft/LLaVA-Med@ad758b687d4e79628dbfdb149dc545641ed29014: llava/eval/run_eval_batch.py, "
    "llava/eval/eval_metrics/{glossary,evaluate_metrics,utils}.py"
)
MCQ_INSTRUCTION = "Answer with the letter of the correct option."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
METRIC_DEFINITIONS = {
    "llava_med_closed_accuracy": "closed questions: normalised ground truth is a substring of the normalised "
    "prediction (LLaVA-Med's rule; 'no' matches 'not', 'normal')",
    "strict_closed_accuracy": "closed questions: yes/no answers need a committed verdict (first word, or the only "
    "yes/no word); other closed answers need an exact match",
    "llava_med_open_recall": "open questions: LLaVA-Med's token recall; shared tokens count with their multiplicity "
    "in the prediction, so repeating a correct word inflates it",
    "token_recall": "open questions: clipped token recall (each reference token counted at most once per occurrence)",
    "llava_med_open_substring_hit": "open questions: the substring rule (run_eval_batch.py's 'open accuracy')",
    "exact_match": "normalised prediction equals the normalised ground truth",
    "token_f1": "SQuAD-style bag-of-tokens F1 on LLaVA-Med-normalised text",
}


MEDEVALKIT_DEFINITIONS = {
    "overall_accuracy": "MedEvalKit's 'total metrics' acc, the number papers print: closed questions by its yes/no "
    "substring rule (closed = yes/no answer text; SLAKE: answer_type), open questions by exact match",
    "open.acc_as_printed": "MedEvalKit's open 'acc' as it prints it: right / n_open / n_open (divided twice)",
    "open.precision/recall/f1": "MedEvalKit's labels, swapped by its unpacking: precision = token-set F1, recall = "
    "precision, f1 = recall; the correctly labelled values are token_precision/token_recall/token_f1",
    "n_harness_would_abort": "open answers (empty after its parsing, or too long) on which MedEvalKit's ROUGE raises "
    "and its run aborts; scored here as wrong",
    "mcq accuracy": "MedEvalKit's judge_multi_choice (PMC-VQA, OmniMedVQA) or MMMU's parse (random pick when "
    "unparsed, seeded by question id here); corrected_accuracy counts unparsed answers as wrong",
}


class DatasetFormatError(InputError):
    """The evaluation data is missing or not in the layout the chosen ``--dataset`` expects."""


class ResumeMismatchError(InputError):
    """The output folder holds predictions made with different settings."""


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "Bundle folder or Hub repo id, loaded with trust_remote_code=True."})
    data_path: str = field(metadata={"help": "Dataset file (or folder, see the module docstring)."})
    dataset: str = field(default="vqa_rad", metadata={"help": f"One of: {', '.join(DATASETS)}."})
    output_dir: str = field(default="eval_results", metadata={"help": "Where predictions and reports go."})
    image_root: str | None = field(default=None, metadata={"help": "Image folder (default: per dataset layout)."})
    split: str = field(
        default="test",
        metadata={
            "help": "Split of the parquet layouts: PathVQA, VQA-RAD (test) and MMMU (validation: its test "
            "answers are not public)."
        },
    )
    language: str = field(default="en", metadata={"help": "SLAKE q_lang to keep ('all' keeps every language)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N questions."})
    batch_size: int = field(default=8, metadata={"help": "Questions per pipeline call (per process)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Answer/caption length (bundle default)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision to pin."})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, float16 or auto."})
    load_in_8bit: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit language model."})
    judge_backend: str | None = field(
        default=None,
        metadata={
            "help": "Optional LLM judge of open answers with MedEvalKit's judge prompt (off by default): a JSON "
            'OpenAI-compatible backend, e.g. \'{"type": "openai", "base_url": "http://127.0.0.1:8000/v1", '
            '"model": "judge", "api": "chat", "api_key_env": "OPENAI_API_KEY"}\'. Never the model under test.'
        },
    )

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise DatasetFormatError(f"--dataset must be one of {', '.join(DATASETS)}.")
        if self.batch_size < 1:
            raise InputError("--batch_size must be at least 1.")
        if self.limit is not None and self.limit < 1:
            raise InputError("--limit must be at least 1 when given.")

    def run_settings(self) -> dict:
        """What must be identical for predictions to be resumed (``limit`` and ``batch_size`` may change)."""
        settings = asdict(self)
        for key in ("output_dir", "limit", "batch_size", "judge_backend"):
            settings.pop(key)
        settings["data_path"] = str(Path(self.data_path).resolve())
        if self.image_root:
            settings["image_root"] = str(Path(self.image_root).resolve())
        return settings


# --------------------------------------------------------------------------------------------------
# Datasets: every loader returns Examples in dataset order
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    qid: str
    question: str
    answer: str
    answer_type: str = "OPEN"
    question_type: str | None = None
    organ: str | None = None
    # A path, raw bytes, or a zero-argument callable returning bytes (lazy images of Arrow datasets).
    image: Any = None
    options: dict[str, str] | None = None
    # Layout-specific fields (the harness's raw choices, modality, subject, image count ...): see vqa_datasets.py.
    extra: dict = field(default_factory=dict)

    def image_source(self):
        return self.image() if callable(self.image) else self.image

    def image_label(self) -> str | None:
        return str(self.image) if isinstance(self.image, (str, Path)) else None


def _require(records: list, fields: Iterable[str], source: str) -> None:
    fields = list(fields)
    if not isinstance(records, list):
        raise DatasetFormatError(f"{source} must hold a list of question records.")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{source}: record {index} is not an object.")
        missing = [name for name in fields if name not in record]
        if missing:
            raise DatasetFormatError(
                f"{source}: record {index} lacks {', '.join(missing)}; expected fields {', '.join(fields)}. "
                "Check --dataset."
            )


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise DatasetFormatError(f"{what} not found at the given --data_path; check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"{what} is not valid JSON (line {getattr(error, 'lineno', '?')}).") from None


def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise DatasetFormatError(f"{what} not found at the given --data_path; check the path.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DatasetFormatError(f"{what}: line {number} is not valid JSON.") from None
    return records


def _answer_type(value, answer: str) -> str:
    if value is None:
        return "CLOSED" if llava_med_normalize(answer) in ("yes", "no") else "OPEN"
    kind = str(value).strip().upper()
    if kind not in ("OPEN", "CLOSED"):
        raise DatasetFormatError("answer_type must be OPEN or CLOSED.")
    return kind


def load_vqa_rad(data_path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """VQA-RAD: a JSON list of ``qid, image_name, question, answer, answer_type[, question_type, image_organ]``."""
    path = Path(data_path)
    if path.is_dir():
        path = path / "questions.json"
    records = _read_json(path, "The VQA-RAD questions file")
    _require(records, ("qid", "image_name", "question", "answer", "answer_type"), "VQA-RAD questions")
    root = Path(image_root) if image_root else path.parent / "images"
    return [
        Example(
            qid=str(r["qid"]),
            question=r["question"],
            answer=str(r["answer"]),
            answer_type=_answer_type(r["answer_type"], str(r["answer"])),
            question_type=r.get("question_type"),
            organ=r.get("image_organ"),
            image=str(root / r["image_name"]),
        )
        for r in records
    ]


def load_slake(data_path: str | Path, image_root: str | Path | None = None, language: str = "en") -> list[Example]:
    """SLAKE ``test.json``: ``img_name, question, answer, answer_type, q_lang`` (+ ``qid, content_type, location``).

    Images live in ``imgs/`` beside ``test.json`` (``imgs/xmlab102/source.jpg``). ``content_type`` is the
    question type and ``location`` the organ/region of the breakdowns.
    """
    path = Path(data_path)
    if path.is_dir():
        path = path / "test.json"
    records = _read_json(path, "The SLAKE test.json")
    _require(records, ("img_name", "question", "answer", "answer_type", "q_lang"), "SLAKE test.json")
    root = Path(image_root) if image_root else path.parent / "imgs"
    return [
        Example(
            qid=str(r.get("qid", index)),
            question=r["question"],
            answer=str(r["answer"]),
            answer_type=_answer_type(r["answer_type"], str(r["answer"])),
            question_type=r.get("content_type"),
            organ=r.get("location"),
            image=str(root / r["img_name"]),
        )
        for index, r in enumerate(records)
        if language == "all" or r["q_lang"] == language
    ]


class _PlainDataUnpickler(pickle.Unpickler):
    """PathVQA ships pickles of plain lists/dicts; anything that needs a class import is refused."""

    def find_class(self, module, name):
        raise DatasetFormatError(
            "The PathVQA pickle references Python objects beyond plain lists/dicts/strings; refusing to load it "
            "(unpickling can run code). Convert it to JSONL and use --dataset jsonl."
        )


def _pathvqa_examples(rows: Iterable[tuple[int, str, str, Any]]) -> list[Example]:
    return [
        Example(
            qid=str(qid),
            question=question,
            answer=str(answer),
            answer_type=_answer_type(None, str(answer)),
            image=image,
        )
        for qid, question, answer, image in rows
    ]


def load_pathvqa(data_path: str | Path, image_root: str | Path | None = None, split: str = "test") -> list[Example]:
    """PathVQA in any of its common releases (closed = yes/no answers, as in the PathVQA paper).

    * official pickle ``pvqa/qas/<split>/<split>_qa.pkl``: ``[{"image": "test_0000", "question", "answer"}]``
      with images ``pvqa/images/<split>/test_0000.jpg``;
    * Hugging Face ``flaviagiammarino/path-vqa`` parquet files (a file, or a folder holding ``<split>-*.parquet``)
      with columns ``image`` (``{"bytes", "path"}``), ``question``, ``answer``;
    * the same dataset after ``datasets``' ``save_to_disk`` (a folder with ``dataset_dict.json``/``state.json``).

    The question id is the row index within the split.
    """
    path = Path(data_path)
    if path.suffix == ".pkl":
        if not path.is_file():
            raise DatasetFormatError("The PathVQA pickle was not found at the given --data_path.")
        with path.open("rb") as handle:
            try:
                records = _PlainDataUnpickler(handle).load()
            except (pickle.UnpicklingError, EOFError):
                raise DatasetFormatError("The PathVQA pickle is corrupt or truncated.") from None
        _require(records, ("image", "question", "answer"), "PathVQA pickle")
        root = Path(image_root) if image_root else path.parents[2] / "images" / path.parent.name
        rows = []
        for index, r in enumerate(records):
            name = str(r["image"])
            rows.append((index, r["question"], r["answer"], str(root / (name if Path(name).suffix else f"{name}.jpg"))))
        return _pathvqa_examples(rows)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _pathvqa_from_saved_dataset(path, split)
    parquet_files = [path] if path.suffix == ".parquet" else sorted(path.glob(f"**/{split}-*.parquet"))
    if not parquet_files or not all(p.is_file() for p in parquet_files):
        raise DatasetFormatError(
            f"No PathVQA data for split '{split}' at the given --data_path: pass the official *_qa.pkl, a parquet "
            "file, a folder holding <split>-*.parquet, or a save_to_disk folder."
        )
    import pyarrow.parquet as pq

    table = pq.read_table([str(p) for p in parquet_files] if len(parquet_files) > 1 else str(parquet_files[0]))
    missing = {"image", "question", "answer"} - set(table.column_names)
    if missing:
        raise DatasetFormatError(f"The PathVQA parquet data lacks column(s) {', '.join(sorted(missing))}.")
    images = table.column("image")
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    return _pathvqa_examples(
        (i, questions[i], answers[i], _arrow_image_bytes(images, i)) for i in range(table.num_rows)
    )


def _arrow_image_bytes(column, index: int) -> Callable[[], bytes]:
    def read() -> bytes:
        value = column[index].as_py()
        return value["bytes"] if isinstance(value, dict) else value

    return read


def _pathvqa_from_saved_dataset(path: Path, split: str) -> list[Example]:
    from datasets import DatasetDict, Image, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DatasetFormatError(f"The saved PathVQA dataset has no split '{split}' ({', '.join(loaded)}).")
        loaded = loaded[split]
    missing = {"image", "question", "answer"} - set(loaded.column_names)
    if missing:
        raise DatasetFormatError(f"The saved PathVQA dataset lacks column(s) {', '.join(sorted(missing))}.")
    raw = loaded.cast_column("image", Image(decode=False))

    def reader(i: int) -> Callable[[], bytes]:
        return lambda: raw[i]["image"]["bytes"]

    return _pathvqa_examples(
        (i, q, a, reader(i)) for i, (q, a) in enumerate(zip(raw["question"], raw["answer"], strict=True))
    )


def load_jsonl(data_path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """Generic JSONL: ``image, question, answer[, answer_type, qid, question_type, organ]`` per line.

    ``image`` is relative to ``--image_root`` (default: the file's folder) or absolute; ``answer_type``
    defaults to CLOSED for yes/no answers and OPEN otherwise; ``qid`` defaults to the line's index.
    """
    path = Path(data_path)
    records = _read_jsonl(path, "The JSONL questions file")
    _require(records, ("image", "question", "answer"), "JSONL questions")
    root = Path(image_root) if image_root else path.parent
    return [
        Example(
            qid=str(r.get("qid", index)),
            question=r["question"],
            answer=str(r["answer"]),
            answer_type=_answer_type(r.get("answer_type"), str(r["answer"])),
            question_type=r.get("question_type"),
            organ=r.get("organ"),
            image=None if r["image"] in (None, "") else str(root / r["image"]),
        )
        for index, r in enumerate(records)
    ]


def load_medqa(data_path: str | Path) -> list[Example]:
    """MedQA-style JSONL: ``question``, ``options`` (``{"A": ...}`` or a list), and the answer letter in
    ``answer_idx`` (MedQA's release) or ``answer`` (a letter, or the text of one option)."""
    path = Path(data_path)
    records = _read_jsonl(path, "The multiple-choice questions file")
    _require(records, ("question", "options"), "Multiple-choice questions")
    examples = []
    for index, r in enumerate(records):
        options = r["options"]
        if isinstance(options, list):
            options = {chr(ord("A") + i): str(text) for i, text in enumerate(options)}
        if not isinstance(options, dict) or not options:
            raise DatasetFormatError(f"Multiple-choice record {index}: 'options' must be a non-empty dict or list.")
        options = {str(letter).strip().upper(): str(text) for letter, text in options.items()}
        answer = str(r.get("answer_idx") or r.get("answer") or "").strip()
        if answer.upper() not in options:
            by_text = [letter for letter, text in options.items() if text.strip() == answer]
            if len(by_text) != 1:
                raise DatasetFormatError(
                    f"Multiple-choice record {index}: the answer is neither an option letter nor one option's text."
                )
            answer = by_text[0]
        examples.append(
            Example(
                qid=str(r.get("qid", r.get("id", index))),
                question=r["question"],
                answer=answer.upper(),
                options=options,
            )
        )
    return examples


def load_roco(data_path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """ROCO captions CSV ``id,name,caption``; images ``<image_root>/<name>`` (default ``images/`` beside it)."""
    path = Path(data_path)
    if not path.is_file():
        raise DatasetFormatError("The ROCO captions CSV was not found at the given --data_path.")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "name", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetFormatError(f"The ROCO CSV lacks column(s) {', '.join(sorted(missing))} (id,name,caption).")
        rows = list(reader)
    root = Path(image_root) if image_root else path.parent / "images"
    return [Example(qid=r["id"], question="", answer=r["caption"].strip(), image=str(root / r["name"])) for r in rows]


def load_examples(args: EvaluationArguments) -> list[Example]:
    """The questions this run evaluates: the dataset (language/split subset applied), then ``--limit``."""
    examples = load_all_examples(args)
    return examples[: args.limit] if args.limit else examples


def load_all_examples(args: EvaluationArguments) -> list[Example]:
    import vqa_datasets  # the Hugging Face / MCQ layouts (imported here: it imports this module)

    path = Path(args.data_path)
    if args.dataset == "vqa_rad" and (path.suffix == ".parquet" or (path.is_dir() and any(path.glob("**/*.parquet")))):
        examples = vqa_datasets.load_vqa_rad_parquet(path, args.split)
    elif args.dataset == "vqa_rad":
        examples = load_vqa_rad(args.data_path, args.image_root)
    elif args.dataset == "pmc_vqa":
        examples = vqa_datasets.load_pmc_vqa(args.data_path, args.image_root)
    elif args.dataset == "omnimedvqa":
        examples = vqa_datasets.load_omnimedvqa(args.data_path, args.image_root)
    elif args.dataset == "mmmu_med":
        examples = vqa_datasets.load_mmmu(args.data_path, args.split)
    elif args.dataset == "slake":
        examples = load_slake(args.data_path, args.image_root, args.language)
    elif args.dataset == "pathvqa":
        examples = load_pathvqa(args.data_path, args.image_root, args.split)
    elif args.dataset == "jsonl":
        examples = load_jsonl(args.data_path, args.image_root)
    elif args.dataset == "medqa":
        examples = load_medqa(args.data_path)
    else:
        examples = load_roco(args.data_path, args.image_root)
    seen: set[str] = set()
    for example in examples:
        if example.qid in seen:
            raise DatasetFormatError("Question ids must be unique: one id occurs twice in the data.")
        seen.add(example.qid)
    if not examples:
        raise DatasetFormatError("The dataset holds no questions (check --language / --split).")
    return examples


# --------------------------------------------------------------------------------------------------
# Predictions: appended per batch, one shard per process, resumable
# --------------------------------------------------------------------------------------------------


def read_predictions(shard_dir: Path) -> dict[str, dict]:
    """Every complete prediction line of every shard, by question id (a torn last line is ignored)."""
    predictions: dict[str, dict] = {}
    for shard in sorted(shard_dir.glob("rank-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            predictions.setdefault(str(record["qid"]), record)
    return predictions


def _open_shard_for_append(shard: Path):
    """Append handle to this process's shard, first cutting a line torn by a kill."""
    if shard.exists():
        data = shard.read_bytes()
        if data and not data.endswith(b"\n"):
            with shard.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    return shard.open("a", encoding="utf-8")


def run_predictions(
    examples: list[Example],
    predict_batch: Callable[[list[Example]], list[dict]],
    shard_dir: Path,
    batch_size: int,
    state,
    desc: str,
) -> int:
    """Predict every example that has no prediction yet, split across processes; returns how many this rank did."""
    from tqdm.auto import tqdm

    shard_dir.mkdir(parents=True, exist_ok=True)
    done = read_predictions(shard_dir)
    # Nobody appends before everybody has read what is done, so all ranks split the same to-do list.
    state.wait_for_everyone()
    todo = [example for example in examples if example.qid not in done]
    if state.is_main_process:
        already = len(examples) - len(todo)
        print(
            f"{already} of {len(examples)} already predicted; {len(todo)} to go on {state.num_processes} process(es)."
        )
        if len(done) > already:
            print(
                f"Note: the output folder holds {len(done) - already} more prediction(s) for questions outside this "
                f"run ({len(examples)} questions: a smaller --limit or another subset than before). They are kept but "
                "not scored; rerun with the earlier --limit to score them."
            )
    predicted = 0
    with state.split_between_processes(todo) as mine:
        shard = shard_dir / f"rank-{state.process_index}.jsonl"
        with (
            _open_shard_for_append(shard) as handle,
            tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process) as progress,
        ):
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                for record in predict_batch(batch):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                predicted += len(batch)
                progress.update(len(batch))
    state.wait_for_everyone()
    return predicted


def _is_project_error(error: BaseException) -> bool:
    # Remote code loads its own copy of the error classes: match by name, not identity.
    return any(cls.__name__ == VisualMedAlpacaError.__name__ for cls in type(error).__mro__)


def _error_note(error: BaseException) -> str:
    # Our messages never contain payloads; other exceptions are named only.
    return f"{type(error).__name__}: {error}" if _is_project_error(error) else type(error).__name__


def answer_requests(vqa, requests: list[dict], generate_kwargs: dict) -> list[dict]:
    """Pipeline records for a batch; if the batch fails, one at a time so one bad image costs one answer."""
    try:
        return list(vqa(requests, batch_size=len(requests), **generate_kwargs))
    except Exception:  # noqa: BLE001 - retried one by one below, where each failure is recorded
        pass
    outputs = []
    for request in requests:
        try:
            outputs.append(vqa(request, **generate_kwargs))
        except Exception as error:  # noqa: BLE001 - recorded as a failed prediction; the run goes on
            outputs.append({"answer": "", "expert": None, "intermediate_text": None, "error": _error_note(error)})
    return outputs


def vqa_predictor(vqa, generate_kwargs: dict) -> Callable[[list[Example]], list[dict]]:
    def predict(batch: list[Example]) -> list[dict]:
        requests = [{"image": example.image_source(), "question": example.question} for example in batch]
        outputs = answer_requests(vqa, requests, generate_kwargs)
        return [
            {
                "qid": example.qid,
                "image": example.image_label(),
                "question": example.question,
                "answer": example.answer,
                "answer_type": example.answer_type,
                "question_type": example.question_type,
                "organ": example.organ,
                "prediction": output["answer"],
                "expert": output.get("expert"),
                "intermediate_text": output.get("intermediate_text"),
                "warnings": output.get("warnings", []),
                "error": output.get("error"),
                "disclaimer": DISCLAIMER,
            }
            for example, output in zip(batch, outputs, strict=True)
        ]

    return predict


def mcq_prompt(example: Example) -> str:
    """The question, its options and the instruction: this whole text fills the Alpaca template's ``{question}``
    slot (the templates themselves are unchanged; the image's expert text stays the ``### Input:``)."""
    if not example.options:  # an MMMU open question: MMMU's construct_prompt instruction
        return f"{example.question.strip()}\n\n{OPEN_INSTRUCTION}"
    choices = "\n".join(f"{letter}. {text}" for letter, text in example.options.items())
    return f"{example.question.strip()}\n\n{choices}\n\n{MCQ_INSTRUCTION}"


def mcq_predictor(vqa, generate_kwargs: dict) -> Callable[[list[Example]], list[dict]]:
    def predict(batch: list[Example]) -> list[dict]:
        requests = []
        for example in batch:
            request = {"question": mcq_prompt(example)}
            if example.image is not None:
                request["image"] = example.image_source()
            requests.append(request)
        outputs = answer_requests(vqa, requests, generate_kwargs)
        return [
            {
                "qid": example.qid,
                "image": example.image_label(),
                "question": example.question,
                "options": example.options,
                "answer": example.answer,
                "question_type": example.question_type,
                "prediction": output["answer"],
                "choice": extract_choice(output["answer"], example.options, example.options)
                if example.options
                else None,
                "expert": output.get("expert"),
                "intermediate_text": output.get("intermediate_text"),
                "warnings": output.get("warnings", []),
                "error": output.get("error"),
                "disclaimer": DISCLAIMER,
            }
            for example, output in zip(batch, outputs, strict=True)
        ]

    return predict


def caption_predictor(vqa, generate_kwargs: dict) -> Callable[[list[Example]], list[dict]]:
    """Med-GIT alone (the pipeline's radiology expert): captions for a batch of images, no language model."""
    from medical_image import load_image

    def predict(batch: list[Example]) -> list[dict]:
        images, errors = [], []
        for example in batch:
            try:
                images.append(load_image(example.image_source()).image)
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - recorded per image; the run goes on
                images.append(None)
                errors.append(_error_note(error))
        readable = [image for image in images if image is not None]
        captions: list[str] = []
        if readable:
            pixel_values = vqa.captioner_processor(images=readable, return_tensors="pt").pixel_values
            ids = vqa.model.caption_images(pixel_values, **generate_kwargs)
            captions = [text.strip() for text in vqa.captioner_processor.batch_decode(ids, skip_special_tokens=True)]
        captions_iter = iter(captions)
        return [
            {
                "qid": example.qid,
                "image": example.image_label(),
                "reference": example.answer,
                "prediction": "" if error else next(captions_iter),
                "error": error,
            }
            for example, error in zip(batch, errors, strict=True)
        ]

    return predict


# --------------------------------------------------------------------------------------------------
# Scoring and reports
# --------------------------------------------------------------------------------------------------


def _binary_ci(records: list[dict], metric: str) -> list[float] | None:
    from medevalkit_metrics import wilson_interval

    hits = [r["scores"][metric] for r in records if metric in r["scores"]]
    return wilson_interval(int(sum(hits)), len(hits))


def score_vqa(
    examples: list[Example], predictions: dict[str, dict], dataset: str = "vqa_rad"
) -> tuple[list[dict], dict]:
    """Per-question records with every scorer's verdict (dataset order) and the report's metric sections.

    Scorer families side by side: ``llava_med`` and ``strict`` (vqa_metrics.py) and ``medevalkit``
    (medevalkit_metrics.py; SLAKE.py's rules for ``slake``, VQA_RAD.py's for the others).
    """
    from medevalkit_metrics import aggregate_vqa, score_vqa_question

    flavour = "slake" if dataset == "slake" else "vqa_rad"
    scored = []
    for example in examples:
        # The dataset, not the prediction file, is the authority on the truth.
        record = dict(predictions[example.qid])
        record.update(
            answer=example.answer,
            answer_type=example.answer_type,
            question_type=example.question_type,
            organ=example.organ,
        )
        record["scores"] = score_question(record["prediction"], example.answer, example.answer_type)
        record["medevalkit"] = score_vqa_question(record["prediction"], example.answer, example.answer_type, flavour)
        record["scores"]["medevalkit_correct"] = float(record["medevalkit"]["correct"])
        scored.append(record)
    closed = [r for r in scored if r["answer_type"] == "CLOSED"]
    open_ = [r for r in scored if r["answer_type"] != "CLOSED"]
    metrics = {
        "metrics": aggregate(scored),
        # Wilson score intervals (95%) for every metric that is a share of right answers.
        "accuracy_ci95": {
            "closed.llava_med_closed_accuracy": _binary_ci(closed, "llava_med_closed_accuracy"),
            "closed.strict_closed_accuracy": _binary_ci(closed, "strict_closed_accuracy"),
            "open.llava_med_open_substring_hit": _binary_ci(open_, "llava_med_open_substring_hit"),
            "overall.exact_match": _binary_ci(scored, "exact_match"),
        },
        "medevalkit": aggregate_vqa(r["medevalkit"] for r in scored),
        "by_question_type": breakdown(scored, "question_type"),
        "by_organ": breakdown(scored, "organ"),
        "n_errors": sum(1 for r in scored if r.get("error")),
    }
    return scored, metrics


def _medevalkit_mcq_verdict(record: dict, example: Example, dataset: str) -> dict:
    """MedEvalKit's verdict for one multiple-choice record (None for sets it does not score this way)."""
    import medevalkit_metrics as mek

    prediction = record["prediction"]
    if dataset in ("pmc_vqa", "omnimedvqa"):
        # OmniMedVQA.py cal_metrics unwraps <answer> first; PMC_VQA.py passes the response as it is.
        response = mek.extract_tag(prediction, "answer") if dataset == "omnimedvqa" else prediction
        correct = mek.judge_multi_choice(example.extra["harness_choices"], example.extra["harness_answer"], response)
        return {"rule": "utils.py judge_multi_choice", "correct": correct, "parsed": record["choice"] is not None}
    if dataset == "mmmu_med":
        if example.options:
            letters = list(example.options)
            letter, parsed = mek.mmmu_parse_multi_choice_response(prediction, letters, example.options, example.qid)
            return {
                "rule": "MMMU eval_utils.py parse_multi_choice_response + eval_multi_choice",
                "correct": letter == example.answer,
                "corrected": parsed and letter == example.answer,
                "choice": letter,
                "parsed": parsed,
            }
        response = mek.cal_metrics_response(prediction)
        return {
            "rule": "MMMU eval_utils.py eval_open over the raw response (its characters)",
            "correct": mek.mmmu_eval_open(example.answer, response),
            "corrected": mek.mmmu_eval_open(
                mek.mmmu_gold(example.answer), mek.mmmu_corrected_open_predictions(response)
            ),
            "parsed": True,
        }
    return {}


def score_mcq(examples: list[Example], predictions: dict[str, dict], dataset: str = "medqa") -> tuple[list[dict], dict]:
    """Multiple choice: our strict letter extraction (``corrected``) beside MedEvalKit's rules (``medevalkit``)."""
    from medevalkit_metrics import aggregate_mcq, wilson_interval

    scored, verdicts = [], []
    for example in examples:
        record = dict(predictions[example.qid])
        record["answer"] = example.answer
        record["correct"] = record.get("choice") is not None and record["choice"] == example.answer
        medevalkit = _medevalkit_mcq_verdict(record, example, dataset)
        if not example.options:  # an MMMU open question: no letter to extract; MMMU's eval_open (corrected) decides
            record["correct"] = bool(medevalkit.get("corrected"))
        if medevalkit:
            record["medevalkit"] = medevalkit
            record["corrected_correct"] = medevalkit.get("corrected", record["correct"])
            verdicts.append(
                {
                    "medevalkit_correct": medevalkit["correct"],
                    "corrected_correct": record["corrected_correct"],
                    "parsed": medevalkit["parsed"],
                    "question_type": example.question_type,
                    "modality": example.extra.get("modality"),
                    "subject": example.extra.get("subject"),
                }
            )
        for key in ("modality", "subject", "n_images"):
            if key in example.extra:
                record[key] = example.extra[key]
        scored.append(record)
    n = len(scored)
    right = sum(r["correct"] for r in scored)
    sections: dict = {
        "metrics": {
            "n": n,
            "accuracy": right / n,
            "accuracy_ci95": wilson_interval(right, n),
            "unparsed_rate": sum(r.get("choice") is None for r in scored) / n,
        },
        "n_errors": sum(1 for r in scored if r.get("error")),
    }
    if verdicts:
        groups = {"omnimedvqa": ("question_type", "modality"), "mmmu_med": ("subject", "question_type")}
        sections["medevalkit"] = aggregate_mcq(verdicts, groups.get(dataset, ()))
    if dataset == "mmmu_med":
        sections["n_multi_image"] = sum(1 for e in examples if e.extra.get("n_images", 0) > 1)
    return scored, sections


def score_captions(examples: list[Example], predictions: dict[str, dict]) -> tuple[list[dict], dict]:
    # Imported here: caption_metrics is its own module (BLEU-4, ROUGE-L, CIDEr), needed only for captions.
    from caption_metrics import score_captions as caption_scores

    scored = [dict(predictions[example.qid]) for example in examples]
    metrics = caption_scores([r["prediction"] for r in scored], [[example.answer] for example in examples])
    return scored, {
        "metrics": {"n": len(scored), **{key: metrics[key] for key in ("bleu4", "rouge_l", "cider")}},
        "n_errors": sum(1 for r in scored if r.get("error")),
    }


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ci(interval) -> str:
    return "–" if not interval else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _run_lines(run: dict | None) -> list[str]:
    if not run:
        return []
    generation = run["generation"]
    bundle = run["bundle"]
    revision = bundle.get("resolved_revision") or bundle.get("requested_revision")
    lines = [
        "## What ran",
        "",
        f"- Questions: {run['n_questions_run']} of {run['n_questions_in_subset']} in the subset "
        f"{json.dumps(run['subset']) if run['subset'] else '(whole set)'}; --limit: {run['limit']}",
        f"- Generation: do_sample={generation['do_sample']}, max_new_tokens={generation['max_new_tokens']} "
        f"({generation['max_new_tokens_source']}), batch_size={generation['batch_size']}",
        f"- Data sha256: `{run['data_sha256']}` ({len(run['data_files'])} file(s))",
        f"- Bundle revision: {f'`{revision}`' if revision else 'none (a local folder)'}"
        + (f"; local folder sha256 `{bundle['local_folder_sha256']}`" if bundle.get("local_folder_sha256") else ""),
        f"- Confidence intervals: {run['confidence_intervals']}",
        "",
    ]
    return lines


def _medevalkit_lines(report: dict) -> list[str]:
    section = report.get("medevalkit")
    if not section:
        return []
    lines = ["## MedEvalKit scorer (its numbers, quirks included; corrected values beside)", ""]
    if report["task"] == "vqa":
        close, open_ = section["close"], section["open"]
        lines += ["| metric | MedEvalKit (%) | corrected (%) | 95% CI |", "|---|---|---|---|"]
        lines.append(
            f"| overall accuracy (n={section['n']}) | {_percent(section['overall_accuracy'])} | "
            f"{_percent(section['overall_accuracy'])} | {_ci(section['overall_accuracy_ci95'])} |"
        )
        lines.append(
            f"| closed accuracy (n={close['n']}) | {_percent(close['accuracy'])} | {_percent(close['accuracy'])} | "
            f"{_ci(close['accuracy_ci95'])} |"
        )
        lines.append(
            f"| open accuracy (n={open_['n']}) | {_percent(open_['acc_as_printed'])} | {_percent(open_['accuracy'])} "
            f"| {_ci(open_['accuracy_ci95'])} |"
        )
        for printed, corrected in (("precision", "token_precision"), ("recall", "token_recall"), ("f1", "token_f1")):
            lines.append(f"| open {printed} | {_percent(open_[printed])} | {_percent(open_[corrected])} | – |")
        for name in ("em", "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougel"):
            lines.append(f"| open {name} | {_percent(open_[name])} | {_percent(open_[name])} | – |")
        lines += [
            "",
            f"MedEvalKit would abort on {section['n_harness_would_abort']} open answer(s) (scored wrong here).",
        ]
        if section["harness_divides_by_zero"]:
            lines.append("This set has no open or no closed question: MedEvalKit would divide by zero here.")
    else:
        lines += ["| group | n | MedEvalKit accuracy (%) | 95% CI | corrected (%) | 95% CI | unparsed |"]
        lines += ["|---|---|---|---|---|---|---|"]
        groups = [("overall", section["overall"])]
        for key, values in section.items():
            if key.startswith("by_"):
                groups += [(f"{key[3:]}: {label}", value) for label, value in values.items()]
        for label, value in groups:
            lines.append(
                f"| {label} | {value['n']} | {_percent(value['accuracy'])} | {_ci(value['accuracy_ci95'])} | "
                f"{_percent(value['corrected_accuracy'])} | {_ci(value['corrected_accuracy_ci95'])} | "
                f"{value['n_unparsed']} |"
            )
    if "n_multi_image" in report:
        lines.append(
            f"\n{report['n_multi_image']} question(s) had several images; the model saw image_1 only (as MedEvalKit)."
        )
    lines += ["", f"Reproduced from {report['medevalkit_source']}.", ""]
    return lines


def _headline(report: dict) -> tuple[str, float | None, list | None]:
    """This run's number on the anchors' scorer (MedEvalKit's accuracy) for the comparison table and plot."""
    section = report.get("medevalkit")
    if not section:
        return "accuracy", report["metrics"].get("accuracy"), report["metrics"].get("accuracy_ci95")
    if report["task"] == "vqa":
        return "MedEvalKit overall accuracy", section["overall_accuracy"], section["overall_accuracy_ci95"]
    return "MedEvalKit accuracy", section["overall"]["accuracy"], section["overall"]["accuracy_ci95"]


def _anchor_lines(report: dict) -> list[str]:
    anchors = report.get("published_anchors")
    if not anchors:
        return []
    name, value, interval = _headline(report)
    lines = [f"## Beside published numbers: theirs, {anchors['label']}", ""]
    lines += ["| model | whose | split | scorer | accuracy (%) |", "|---|---|---|---|---|"]
    lines.append(
        f"| `{report['model']}` | **this run** | {report['n']} questions | {name} | {_percent(value)} {_ci(interval)} |"
    )
    for row in anchors["rows"]:
        lines.append(
            f"| {row['model']} | theirs (published) | {row['split']} | {row['scorer']} | {row['number']:.1f} |"
        )
    sources = sorted({row["source"] for row in anchors["rows"]})
    notes = sorted({row.get("note") or "" for row in anchors["rows"]} - {""})
    lines += ["", *[f"Source of their numbers: {source}" for source in sources], *[f"Note: {note}" for note in notes]]
    lines.append("")
    return lines


def markdown_report(report: dict) -> str:
    lines = [f"# Evaluation: {report['dataset']}", "", f"- Model: `{report['model']}`", f"- Questions: {report['n']}"]
    lines += [f"- Failed predictions (scored as wrong): {report['n_errors']}", "", f"> {DISCLAIMER}", ""]
    lines += _run_lines(report.get("run"))
    metrics = report["metrics"]
    if report["task"] == "vqa":
        lines += ["| questions | metric | score (%) |", "|---|---|---|"]
        for group, names in (("closed", metrics["closed"]), ("open", metrics["open"]), ("overall", metrics["overall"])):
            count = metrics["n_closed"] if group == "closed" else metrics["n_open"] if group == "open" else metrics["n"]
            for name, value in names.items():
                lines.append(f"| {group} (n={count}) | {name} | {_percent(value)} |")
        for title, key in (("question type", "by_question_type"), ("organ", "by_organ")):
            if not report[key]:
                continue
            lines += ["", f"## By {title}", ""]
            lines += [
                f"| {title} | n | closed: LLaVA-Med | closed: strict | open: LLaVA-Med recall | open: token recall "
                "| exact match | token F1 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for label, group in report[key].items():
                closed, open_, overall = group["closed"], group["open"], group["overall"]
                lines.append(
                    f"| {label} | {group['n']} | {_percent(closed['llava_med_closed_accuracy'])} | "
                    f"{_percent(closed['strict_closed_accuracy'])} | {_percent(open_['llava_med_open_recall'])} | "
                    f"{_percent(open_['token_recall'])} | {_percent(overall['exact_match'])} | "
                    f"{_percent(overall['token_f1'])} |"
                )
        ci = report.get("accuracy_ci95", {})
        if ci:
            lines += ["", "Wilson 95% intervals: " + "; ".join(f"{name} {_ci(value)}" for name, value in ci.items())]
        lines += ["", "## Metric definitions", ""]
        lines += [f"- `{name}`: {text}" for name, text in METRIC_DEFINITIONS.items()]
        lines += ["", f"LLaVA-Med's rules reproduced from {LLAVA_MED_SOURCE}.", ""]
    else:
        lines += ["| metric | score |", "|---|---|"]
        for name, value in metrics.items():
            if name == "n" or isinstance(value, list):
                continue
            interval = metrics.get(f"{name}_ci95")
            lines.append(f"| {name} | {value:.4f}" + (f" (95% CI {_ci(interval)}) |" if interval else " |"))
        lines.append("")
    lines += _medevalkit_lines(report)
    judge = report.get("llm_judge")
    if judge:
        lines += [
            f"## LLM judge ({judge['judge']}, MedEvalKit's prompt)",
            "",
            f"- open accuracy: {_percent(judge['open_accuracy'])} {_ci(judge['open_accuracy_ci95'])} over "
            f"{judge['n_judged']} judged questions ({judge['n_failed_calls']} failed calls, counted wrong)",
            f"- overall accuracy (closed by rule, open by judge): {_percent(judge['overall_accuracy'])} "
            f"{_ci(judge['overall_accuracy_ci95'])}; as MedEvalKit prints it for this data set: "
            f"{_percent(judge['overall_accuracy_as_printed'])}",
            "",
        ]
    lines += _anchor_lines(report)
    return "\n".join(lines).rstrip("\n") + "\n"


def bar_chart(report: dict, path: Path) -> None:
    """This run's scores (Wilson 95% error bars where the score is an accuracy) and, in another colour and
    hatched, the published numbers on the same benchmark; a legend says which is whose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, ci = report["metrics"], report.get("accuracy_ci95", {})
    if report["task"] == "vqa":
        ours = {
            "closed acc\n(LLaVA-Med)": (
                metrics["closed"]["llava_med_closed_accuracy"],
                ci.get("closed.llava_med_closed_accuracy"),
            ),
            "closed acc\n(strict)": (
                metrics["closed"]["strict_closed_accuracy"],
                ci.get("closed.strict_closed_accuracy"),
            ),
            "open recall\n(LLaVA-Med)": (metrics["open"]["llava_med_open_recall"], None),
            "open recall\n(clipped)": (metrics["open"]["token_recall"], None),
            "exact\nmatch": (metrics["overall"]["exact_match"], ci.get("overall.exact_match")),
            "token\nF1": (metrics["overall"]["token_f1"], None),
        }
    else:
        ours = {
            ("accuracy\n(strict letter)" if name == "accuracy" else name): (value, metrics.get(f"{name}_ci95"))
            for name, value in metrics.items()
            if name not in ("n", "unparsed_rate") and not isinstance(value, list)
        }
    if report.get("medevalkit"):
        name, value, interval = _headline(report)
        ours[name.replace(" accuracy", "\naccuracy")] = (value, interval)
    anchors = (report.get("published_anchors") or {}).get("rows", [])
    labels = list(ours) + [f"{row['model']}\n(published)" for row in anchors]
    values = [0.0 if v is None else 100 * v for v, _ in ours.values()] + [row["number"] for row in anchors]
    errors = [[0.0] * len(labels), [0.0] * len(labels)]
    for index, (value, interval) in enumerate(ours.values()):
        if value is not None and interval:
            errors[0][index], errors[1][index] = (
                max(0.0, 100 * (value - interval[0])),
                max(0.0, 100 * (interval[1] - value)),
            )
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4.2))
    positions = list(range(len(labels)))
    n_ours = len(ours)
    axis.bar(positions[:n_ours], values[:n_ours], color="#4c72b0", label="this run (95% Wilson CI where an accuracy)")
    axis.errorbar(
        positions[:n_ours], values[:n_ours], yerr=[e[:n_ours] for e in errors], fmt="none", ecolor="black", capsize=3
    )
    if anchors:
        axis.bar(
            positions[n_ours:],
            values[n_ours:],
            color="#c8c8c8",
            hatch="//",
            edgecolor="#555555",
            label="published by others (MedEvalKit scorer, their split)",
        )
    raw_values = [v for v, _ in ours.values()] + [row["number"] for row in anchors]
    for x, value, raw in zip(positions, values, raw_values, strict=True):
        axis.text(x, value + 1, "n/a" if raw is None else f"{value:.1f}", ha="center", fontsize=7)
    axis.set_xticks(positions, labels, fontsize=7, rotation=30 if len(labels) > 8 else 0)
    axis.set_ylim(0, 115)
    axis.set_ylabel("score (%)")
    axis.legend(loc="upper right", fontsize=7)
    axis.set_title(f"{report['dataset']} — {report['n']} questions (research use only)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(output_dir: Path, report: dict, scored: list[dict]) -> None:
    with (output_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for record in scored:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(markdown_report(report), encoding="utf-8")
    bar_chart(report, output_dir / "report.png")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _check_resume(output_dir: Path, settings: dict, state, record: bool = True) -> None:
    """Refuse an output folder holding predictions of other settings; with ``record``, write this run's."""
    config_path = output_dir / "run_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8"))
        changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
        if changed:
            raise ResumeMismatchError(
                f"{output_dir} holds predictions made with different {', '.join(changed)}. Use a new --output_dir "
                "or delete that folder to start over."
            )
    elif record and state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        temporary = config_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, config_path)


def load_pipeline(args: EvaluationArguments, device):
    """The bundle's pipeline; a failure is a one-line ``ModelLoadError`` naming the cause (``hub_errors.py``)."""
    from transformers import pipeline

    from hub_errors import load_failure_message
    from modeling_visual_med_alpaca import ModelLoadError

    model_kwargs = {"load_in_8bit": True} if args.load_in_8bit else {}
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    if not args.load_in_8bit:
        kwargs["device"] = device
    try:
        return pipeline(
            model=args.model, revision=args.revision, trust_remote_code=True, model_kwargs=model_kwargs, **kwargs
        )
    except Exception as error:
        if getattr(error, "exit_code", None) is not None:
            raise
        raise ModelLoadError(load_failure_message(error, args.model, args.revision)) from None


def process_state():
    """accelerate's PartialState, on CPU when asked (or when several processes run without CUDA).

    PartialState reads ACCELERATE_USE_CPU only through its ``cpu`` argument; without it, CPU processes
    started by ``accelerate launch``/``torchrun`` each believe they are alone and would all do every question.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes != world_size:
        raise InputError(
            f"{world_size} processes were launched but accelerate formed a group of {state.num_processes}. "
            "On CPU launch with: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N evaluate_vqa.py"
        )
    return state


def _judge_config(args: EvaluationArguments, vqa):
    """The LLM judge's backend, or None; refused when it is the model under test (or the bundle's own server)."""
    if not args.judge_backend:
        return None
    from benchmark_report import parse_judge
    from language_backends import parse_backend

    return parse_judge(args.judge_backend, args.model, parse_backend(vqa.model.config.language_backend))


def _run_description(args: EvaluationArguments, vqa, task: str, n_available: int, n_run: int) -> dict:
    """Exactly what ran: subset, limit, generation settings, data digest, bundle revision, interval method."""
    from benchmark_report import bundle_revision, effective_generation
    from vqa_datasets import data_files, files_digest

    files = data_files(args.dataset, args.data_path, args.split)
    subset = {"split": args.split} if args.dataset in ("pathvqa", "vqa_rad", "mmmu_med") else {}
    if args.dataset == "slake":
        subset = {"language": args.language}
    return {
        "limit": args.limit,
        "n_questions_in_subset": n_available,
        "n_questions_run": n_run,
        "subset": subset,
        "generation": {**effective_generation(vqa, args.max_new_tokens, task), "batch_size": args.batch_size},
        "data_files": [str(f) for f in files],
        "data_sha256": files_digest(files),
        "bundle": bundle_revision(vqa, args.model, args.revision),
        "dtype": args.dtype,
        "load_in_8bit": args.load_in_8bit,
        "confidence_intervals": "Wilson score interval, 95%, for every accuracy (a share of right answers); "
        "none for recall/F1/BLEU/ROUGE means",
    }


def _add_anchors(report: dict) -> None:
    from benchmark_report import ANCHOR_LABEL, published_anchors

    rows = published_anchors(report["dataset"])
    if rows:
        report["published_anchors"] = {"label": ANCHOR_LABEL, "rows": rows}


def main(args: EvaluationArguments) -> dict | None:
    """Run (or resume) the evaluation; the main process returns the report, the others None."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    state = process_state()
    try:
        output_dir = Path(args.output_dir)
        all_examples = load_all_examples(args)
        examples = all_examples[: args.limit] if args.limit else all_examples
        if args.judge_backend:  # a malformed judge, or the model under test by name, fails before any work
            from benchmark_report import parse_judge

            parse_judge(args.judge_backend, args.model)
        # Checked before the (slow) load, recorded after it: a failed load leaves no run_config.json behind
        # that would refuse the corrected rerun.
        _check_resume(output_dir, args.run_settings(), state, record=False)
        vqa = load_pipeline(args, state.device)
        _check_resume(output_dir, args.run_settings(), state)
        judge = _judge_config(args, vqa)
        generate_kwargs: dict = {"do_sample": False}
        if args.max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = args.max_new_tokens
        if args.dataset == "roco":
            task, predictor = "captions", caption_predictor(vqa, dict(generate_kwargs))
        elif args.dataset in MCQ_DATASETS:
            task, predictor = "mcq", mcq_predictor(vqa, generate_kwargs)
        else:
            task, predictor = "vqa", vqa_predictor(vqa, generate_kwargs)
        shard_dir = output_dir / "predictions"
        predicted = run_predictions(examples, predictor, shard_dir, args.batch_size, state, desc=args.dataset)
        if not state.is_main_process:
            state.wait_for_everyone()
            return None
        predictions = read_predictions(shard_dir)
        if task == "captions":
            scored, sections = score_captions(examples, predictions)
        else:
            scored, sections = {"vqa": score_vqa, "mcq": score_mcq}[task](examples, predictions, args.dataset)
        if judge is not None and task == "vqa":
            from benchmark_report import apply_llm_judge

            sections["llm_judge"] = apply_llm_judge(scored, judge, args.dataset)
        report = {
            "dataset": args.dataset,
            "task": task,
            "model": args.model,
            "revision": args.revision,
            "data_path": args.data_path,
            "n": len(examples),
            "run": _run_description(args, vqa, task, len(all_examples), len(examples)),
            "predicted_in_this_run_by_main_process": predicted,
            "num_processes": state.num_processes,
            **sections,
            "disclaimer": DISCLAIMER,
        }
        if task == "vqa":
            report["metric_definitions"] = METRIC_DEFINITIONS
            report["llava_med_source"] = LLAVA_MED_SOURCE
        if "medevalkit" in sections:
            from medevalkit_metrics import MEDEVALKIT_SOURCE

            report["medevalkit_source"] = MEDEVALKIT_SOURCE
            report["medevalkit_definitions"] = MEDEVALKIT_DEFINITIONS
        _add_anchors(report)
        write_outputs(output_dir, report, scored)
        print(markdown_report(report))
        state.wait_for_everyone()
        return report
    finally:
        # Every rank ends the process group (a no-op in a single process). No barrier here: after a failure
        # on one rank, the launcher stops the others.
        state.destroy_process_group()


def parse_arguments(argv: list[str] | None = None) -> EvaluationArguments:
    from trl import TrlParser

    parser = TrlParser((EvaluationArguments,))
    # TrlParser reads --config itself (before parsing); declared here too so --help lists it.
    parser.add_argument("--config", metavar="RECIPE_YAML", help="YAML file of these keys; flags given override it.")
    return parser.parse_args_and_config(argv)[0]


if __name__ == "__main__":
    try:
        main(parse_arguments())
    except VisualMedAlpacaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
