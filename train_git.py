"""Fine-tune GIT into Med-GIT, the radiology captioner, with the transformers ``Trainer``.

Data (pick one; the layout is detected, or set ``--dataset_format``):
  * the original Visual Med-Alpaca layout: ``--train_file train.csv [--validation_file val.csv]
    --image_dir images/`` with columns ``id,name,caption`` (``name`` is the image file name);
  * an imagefolder-style folder: ``--data_dir DIR`` holding ``metadata.csv``/``metadata.jsonl``
    (``file_name``, ``text``), either at its root or in ``train/`` and ``validation/`` subfolders;
  * the folder that the ROCO repository's ``scripts/fetch.py`` fills: ``--data_dir roco-dataset``
    (``data/{train,validation}/{radiology,non-radiology}/`` with tab-separated ``captions.txt`` and
    ``dlinks.txt`` and the fetched ``images/PMCID_NAME``); ``--roco_categories`` picks the subsets;
  * any ``datasets`` dataset with an image and a text column: ``--dataset_name NAME_OR_SAVED_DIR``.
Without validation data, ``--validation_fraction`` holds out a share of the training rows.

Bad rows (missing or unreadable image, empty caption) are skipped, counted and listed by id at the
end and in ``OUTPUT_DIR/bad_rows.json``; odd image modes (16-bit, RGBA, CMYK, palette) are
normalised by the pipeline's loader and counted. More than ``--max_bad_fraction`` bad rows stops
the run before training.

    # one process
    python train_git.py --train_file train.csv --validation_file val.csv --image_dir images \\
        --output_dir med-git --per_device_train_batch_size 4 --learning_rate 5e-5 --num_train_epochs 3 \\
        --eval_strategy epoch --save_strategy epoch
    # a recipe file (any argument; the command line overrides it)
    python train_git.py --config recipe.yaml
    # several GPUs (DDP), or two CPU processes
    accelerate launch --num_processes 8 train_git.py --config recipe.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_git.py --config recipe.yaml
    # after a crash or kill: continue from the newest checkpoint in --output_dir
    python train_git.py --config recipe.yaml --resume_from_checkpoint last
    # publish (private unless --hub_private_repo false; a failed push keeps the local output)
    python train_git.py --config recipe.yaml --push_to_hub --hub_model_id org/med-git

The output folder holds ``GitForCausalLM`` safetensors weights, the ``GitProcessor``, a model card
(``README.md``) with the research-use disclaimer, ``run_summary.json`` and ``bad_rows.json``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from PIL import Image
from tqdm.auto import tqdm
from transformers import GitForCausalLM, GitProcessor, Trainer, TrainingArguments, set_seed
from trl import TrlParser

from caption_metrics import score_captions
from hub_push import HubPushError, push_folder
from medical_image import load_image
from modeling_visual_med_alpaca import DISCLAIMER, ImageInputError, InputError, ModelLoadError, VisualMedAlpacaError
from training_runs import (
    RunRecordCallback,
    describe_resume,
    file_digest,
    make_run_record,
    prepare_run,
    training_settings,
)

logger = logging.getLogger("train_git")

ROCO_SPLITS = {"train": "train", "validation": "validation"}
IMAGEFOLDER_SPLITS = {"train": ("train",), "validation": ("validation", "val", "valid")}
CAPTION_COLUMNS = ("text", "caption", "captions", "sentence")
NATIVE_MODES = ("RGB", "L")  # anything else is normalised by the loader and counted


class CaptionDataError(InputError):
    """The caption data cannot be used: unknown layout, missing columns, or too many bad rows."""


@dataclass
class GitModelArguments:
    model_name_or_path: str = field(
        default="microsoft/git-base", metadata={"help": "GitForCausalLM to fine-tune: a Hub id or a local folder."}
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "GitProcessor to use; defaults to --model_name_or_path."}
    )
    max_caption_tokens: int = field(default=128, metadata={"help": "Captions are truncated to this many tokens."})
    generation_max_new_tokens: int = field(
        default=40, metadata={"help": "Longest caption generated for the BLEU/ROUGE/CIDEr evaluation."}
    )
    generation_num_beams: int = field(default=1, metadata={"help": "Beams for evaluation captions (1 = greedy)."})
    caption_metrics: bool = field(
        default=True, metadata={"help": "Score generated validation captions (BLEU-4, ROUGE-L, CIDEr) at each eval."}
    )


@dataclass
class CaptionDataArguments:
    dataset_format: str = field(default="auto", metadata={"help": "auto | csv | imagefolder | roco | datasets"})
    train_file: str | None = field(default=None, metadata={"help": "CSV with columns id,name,caption (training)."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV with columns id,name,caption."})
    image_dir: str | None = field(
        default=None, metadata={"help": "Folder of the images named in the CSVs (default: the CSV's folder)."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "An imagefolder-style folder or a ROCO checkout."})
    roco_categories: str = field(
        default="radiology", metadata={"help": "ROCO subsets, comma-separated: radiology,non-radiology."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets Hub id, loading script or save_to_disk folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The datasets configuration name."})
    train_split: str = field(default="train", metadata={"help": "Training split of --dataset_name."})
    validation_split: str | None = field(default="validation", metadata={"help": "Validation split, if any."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the first Image)."})
    caption_column: str | None = field(default=None, metadata={"help": "Caption column (default: text/caption)."})
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Share of training rows held out for validation when none is given."}
    )
    max_bad_fraction: float = field(
        default=0.05, metadata={"help": "Stop before training when more than this share of rows is unusable."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    image_threads: int = field(
        default=8, metadata={"help": "Threads that decode images: the check before training, evaluation captions."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an --output_dir that holds another run's output (a training output only)."},
    )


# --------------------------------------------------------------------------------------------- data


@dataclass
class CaptionRecord:
    example_id: str
    caption: str
    image: Any  # a path, or a zero-argument callable returning what load_image accepts
    problem: str | None = None  # set when the row itself could not be parsed


@dataclass
class BadRow:
    example_id: str
    split: str
    reason: str


def _resolve_image(image):
    source = image() if callable(image) else image
    if isinstance(source, dict):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
    if source is None:
        raise ImageInputError("The row names no image.")
    return source


def read_caption_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[CaptionRecord]:
    """The original layout: ``id,name,caption`` rows, images named ``name`` inside ``image_dir``."""
    csv_path = Path(csv_path)
    image_dir = Path(image_dir) if image_dir else csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "name", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise CaptionDataError(f"{csv_path.name} lacks the columns {sorted(missing)}: expected id,name,caption.")
        return [
            CaptionRecord(
                row["id"] or f"{csv_path.name}:line{line}",
                row["caption"] or "",
                str(image_dir / row["name"]) if row["name"] else None,
            )
            for line, row in enumerate(reader, start=2)
        ]


def read_imagefolder(folder: str | os.PathLike, caption_column: str | None = None) -> list[CaptionRecord]:
    """An imagefolder-style folder: ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and ``text``."""
    folder = Path(folder)
    if (folder / "metadata.jsonl").is_file():
        rows = []
        with (folder / "metadata.jsonl").open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        rows.append({"_problem": f"metadata.jsonl line {number} is not valid JSON"})
    elif (folder / "metadata.csv").is_file():
        with (folder / "metadata.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise CaptionDataError(f"No metadata.jsonl or metadata.csv in {folder}: add one with file_name and text.")
    column = caption_column or next((c for c in CAPTION_COLUMNS if rows and c in rows[0]), "text")
    records = []
    for number, row in enumerate(rows, start=1):
        name = str(row.get("file_name") or "")
        caption = row.get(column)
        records.append(
            CaptionRecord(
                str(row.get("id") or name or f"{folder.name}/metadata:row{number}"),
                caption if isinstance(caption, str) else "",
                str(folder / name) if name else None,
                row.get("_problem"),
            )
        )
    return records


def _read_tab_file(path: Path) -> dict[str, list[str]]:
    with path.open(encoding="utf-8") as handle:
        return {parts[0]: parts[1:] for parts in (line.rstrip("\n").split("\t") for line in handle) if parts[0]}


def _roco_file(folder: Path, stem: str) -> Path:
    # fetch.py reads ``dlinks.txt``; later commits of the ROCO repo also ship ``<stem>_*_revised.txt`` files.
    exact = folder / f"{stem}.txt"
    if exact.is_file():
        return exact
    candidates = sorted(folder.glob(f"{stem}*.txt"))
    if not candidates:
        raise CaptionDataError(f"No {stem}.txt in the ROCO folder {folder.name}: is the checkout complete?")
    return candidates[0]


def find_roco_root(data_dir: str | os.PathLike) -> Path | None:
    for root in (Path(data_dir), Path(data_dir) / "data"):
        if any((root / "train" / category / "captions.txt").is_file() for category in ("radiology", "non-radiology")):
            return root
    return None


def read_roco_split(root: Path, split: str, categories: list[str]) -> list[CaptionRecord]:
    """One split of a ROCO checkout after ``scripts/fetch.py``.

    ``captions.txt``: ``ROCO_ID<TAB> caption``; ``dlinks.txt``: ``ROCO_ID<TAB>wget -r URL/PMCID.tar.gz -P
    DIR<TAB>IMAGE_NAME``; fetch.py stores each image as ``images/<PMCID>_<IMAGE_NAME>`` beside them.
    """
    records = []
    for category in categories:
        folder = root / split / category
        if not folder.is_dir():
            raise CaptionDataError(f"The ROCO checkout has no {split}/{category} folder.")
        captions = _read_tab_file(_roco_file(folder, "captions"))
        links = _read_tab_file(_roco_file(folder, "dlinks"))
        for roco_id, caption_parts in captions.items():
            image = None
            link = links.get(roco_id)
            if link and len(link) >= 2:
                archive_url = next((word for word in link[0].split() if word.endswith(".tar.gz")), "")
                pmc_id = archive_url.rsplit("/", 1)[-1].removesuffix(".tar.gz")
                image = str(folder / "images" / f"{pmc_id}_{link[-1].strip()}")
            records.append(CaptionRecord(roco_id, "\t".join(caption_parts), image))
    return records


def _dataset_image(dataset, column: str, index: int):
    return dataset[index][column]


def read_datasets_split(dataset, split_name: str, image_column: str | None, caption_column: str | None):
    """Rows of a ``datasets`` split; images stay undecoded so a corrupt one is a bad row, not a crash."""
    import datasets

    image_column = image_column or next(
        (name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)), None
    )
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in dataset.column_names), None)
    if image_column not in dataset.column_names or caption_column not in dataset.column_names:
        raise CaptionDataError(
            f"Split {split_name!r} needs an image and a caption column; it has {dataset.column_names}: "
            "name them with --image_column and --caption_column."
        )
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    id_column = next((c for c in ("id", "image_id") if c in dataset.column_names), None)
    images_only = dataset.select_columns([image_column])
    records = []
    for index, row in enumerate(dataset.select_columns([c for c in (id_column, caption_column) if c])):
        caption = row[caption_column]
        if isinstance(caption, (list, tuple)):  # several references: train on the first
            caption = next((c for c in caption if isinstance(c, str) and c.strip()), "")
        example_id = str(row[id_column]) if id_column else f"{split_name}:{index}"
        image = functools.partial(_dataset_image, images_only, image_column, index)
        records.append(CaptionRecord(example_id, caption if isinstance(caption, str) else "", image))
    return records


def resolve_layout(args: CaptionDataArguments) -> str:
    layout = args.dataset_format
    if layout == "auto":
        if args.train_file:
            layout = "csv"
        elif args.dataset_name:
            layout = "datasets"
        elif args.data_dir:
            layout = "roco" if find_roco_root(args.data_dir) else "imagefolder"
        else:
            raise CaptionDataError("No data given: pass --train_file, --data_dir or --dataset_name.")
    return layout


def describe_data(args: CaptionDataArguments) -> dict:
    """What the run was trained on, for cards: the layout and the name of what was given (never a full local path)."""
    source = args.train_file or args.data_dir or args.dataset_name or ""
    local = Path(source).exists()
    return {"format": resolve_layout(args), "source": Path(source).name if local else source, "local": local}


def load_caption_splits(args: CaptionDataArguments) -> dict[str, list[CaptionRecord]]:
    """Raw rows per split (``train`` and, when given, ``validation``), not yet checked."""
    layout = resolve_layout(args)
    splits: dict[str, list[CaptionRecord]] = {}
    if layout == "csv":
        if not args.train_file:
            raise CaptionDataError("--dataset_format csv needs --train_file (and optionally --validation_file).")
        splits["train"] = read_caption_csv(args.train_file, args.image_dir)
        if args.validation_file:
            splits["validation"] = read_caption_csv(args.validation_file, args.image_dir)
    elif layout == "roco":
        root = find_roco_root(args.data_dir or "")
        if root is None:
            raise CaptionDataError("--data_dir is not a ROCO checkout (expected data/train/radiology/captions.txt).")
        categories = [c.strip() for c in args.roco_categories.split(",") if c.strip()]
        splits = {name: read_roco_split(root, folder, categories) for name, folder in ROCO_SPLITS.items()}
    elif layout == "imagefolder":
        data_dir = Path(args.data_dir or "")
        for split, names in IMAGEFOLDER_SPLITS.items():
            folder = next((data_dir / n for n in names if (data_dir / n).is_dir()), None)
            if folder is not None:
                splits[split] = read_imagefolder(folder, args.caption_column)
        if "train" not in splits:
            splits["train"] = read_imagefolder(data_dir, args.caption_column)
    elif layout == "datasets":
        import datasets

        name = args.dataset_name or ""
        if Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, args.dataset_config_name)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({args.train_split: loaded})
        wanted = {"train": args.train_split, "validation": args.validation_split}
        for split, split_name in wanted.items():
            if split_name and split_name in loaded:
                splits[split] = read_datasets_split(
                    loaded[split_name], split_name, args.image_column, args.caption_column
                )
        if "train" not in splits:
            raise CaptionDataError(f"{name} has no split {args.train_split!r}: choose one with --train_split.")
    else:
        raise CaptionDataError(f"Unknown --dataset_format {layout!r}: use auto, csv, imagefolder, roco or datasets.")
    return splits


def _check_record(record: CaptionRecord) -> tuple[str | None, str | None]:
    """``(reason it is bad or None, image mode that was normalised or None)``."""
    if record.problem:
        return record.problem, None
    if not record.caption.strip():
        return "empty caption", None
    try:
        source = _resolve_image(record.image)
        load_image(source)
    except ImageInputError as error:
        return str(error), None
    except (OSError, ValueError, KeyError, TypeError):  # a datasets row that cannot be read at all
        return "the image could not be read", None
    try:  # only to count the modes the loader normalised; formats PIL cannot open (DICOM) are not counted
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            return None, (opened.mode if opened.mode not in NATIVE_MODES else None)
    except (OSError, ValueError, TypeError):
        return None, None


@dataclass
class DataReport:
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    normalised_modes: Counter = field(default_factory=Counter)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad_rows) / self.rows if self.rows else 0.0


def check_records(
    records: list[CaptionRecord], split: str, report: DataReport, workers: int = 8, show_progress: bool = True
) -> list[CaptionRecord]:
    """Keep the usable rows (captions stripped); add the others to ``report`` with their id and reason."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(
            tqdm(
                pool.map(_check_record, records),
                total=len(records),
                desc=f"Checking {split} images",
                disable=not show_progress,
            )
        )
    usable = []
    for record, (reason, mode) in zip(records, outcomes, strict=True):
        report.rows += 1
        if reason:
            report.bad_rows.append(BadRow(record.example_id, split, reason))
            continue
        if mode:
            report.normalised_modes[mode] += 1
        usable.append(CaptionRecord(record.example_id, record.caption.strip(), record.image))
    return usable


def write_bad_rows(report: DataReport, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bad_rows.json").write_text(json.dumps([asdict(row) for row in report.bad_rows], indent=2))


def prepare_caption_data(
    args: CaptionDataArguments, seed: int = 42, show_progress: bool = True, report_dir: Path | None = None
) -> tuple[dict[str, list[CaptionRecord]], DataReport]:
    """Read, check and split the data; list bad rows in ``report_dir/bad_rows.json``.

    Raises ``CaptionDataError`` when more than ``args.max_bad_fraction`` of the rows are bad.
    """
    raw = load_caption_splits(args)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    report = DataReport()
    splits = {
        split: check_records(rows[: limits[split]], split, report, args.image_threads, show_progress)
        for split, rows in raw.items()
    }
    if report_dir is not None:
        write_bad_rows(report, report_dir)
    if report.bad_fraction > args.max_bad_fraction:
        raise CaptionDataError(
            f"{len(report.bad_rows)} of {report.rows} rows ({report.bad_fraction:.1%}) are unusable, more than "
            f"--max_bad_fraction {args.max_bad_fraction}: fix the data (ids and reasons in bad_rows.json in the "
            "output folder) or raise the limit."
        )
    if not splits.get("train"):
        raise CaptionDataError("No usable training rows are left after skipping bad rows.")
    if "validation" not in splits and args.validation_fraction > 0:
        rows = list(splits["train"])
        random.Random(seed).shuffle(rows)
        held_out = max(1, round(len(rows) * args.validation_fraction))
        if held_out >= len(rows):
            raise CaptionDataError("--validation_fraction leaves no training rows: lower it.")
        splits = {"train": rows[held_out:], "validation": rows[:held_out]}
    return splits, report


class CaptionDataset(torch.utils.data.Dataset):
    """Checked rows -> ``pixel_values`` and caption token ids; images are decoded when a batch needs them."""

    def __init__(self, records: list[CaptionRecord], processor: GitProcessor, max_caption_tokens: int = 128):
        self.records = records
        self.processor = processor
        self.max_caption_tokens = max_caption_tokens

    def __len__(self) -> int:
        return len(self.records)

    def pixel_values(self, index: int) -> torch.Tensor:
        image = load_image(_resolve_image(self.records[index].image)).image
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict:
        input_ids = self.processor.tokenizer(
            self.records[index].caption, truncation=True, max_length=self.max_caption_tokens
        )["input_ids"]
        return {"pixel_values": self.pixel_values(index), "input_ids": input_ids}


@dataclass
class CaptionCollator:
    """Pads captions per batch; padding is masked out of the loss (label -100), unlike the original script."""

    tokenizer: Any

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        text = self.tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], padding=True, return_tensors="pt")
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": text["input_ids"].masked_fill(text["attention_mask"] == 0, -100),
        }


# ------------------------------------------------------------------------------------------ training


def generate_captions(
    model,
    dataset: CaptionDataset,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    image_threads: int = 4,
    **generate_kwargs,
) -> list[tuple[int, str]]:
    """``(index, caption)`` for this process's share of ``dataset``, ``batch_size`` images per ``generate``.

    Images of the next batch are decoded by ``image_threads`` threads while the current batch generates.
    """
    indices = list(range(process_index, len(dataset), num_processes))
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    tokenizer = dataset.processor.tokenizer
    captions = []
    was_training = model.training
    model.eval()
    with ThreadPoolExecutor(max_workers=max(1, image_threads)) as pool:
        pending = [pool.submit(dataset.pixel_values, i) for i in batches[0]] if batches else []
        for number, batch in enumerate(tqdm(batches, desc="Generating captions", disable=process_index != 0)):
            pixel_values = torch.stack([future.result() for future in pending])
            if number + 1 < len(batches):
                pending = [pool.submit(dataset.pixel_values, i) for i in batches[number + 1]]
            pixel_values = pixel_values.to(model.device, dtype=model.dtype)
            with torch.inference_mode():
                generated = model.generate(pixel_values=pixel_values, **generate_kwargs)
            captions.extend(zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True))
    model.train(was_training)
    return captions


class CaptionTrainer(Trainer):
    """``Trainer`` whose evaluation adds BLEU-4 / ROUGE-L / CIDEr of batched generated captions to the loss."""

    def __init__(
        self,
        *args,
        generation_kwargs: dict | None = None,
        caption_metrics: bool = True,
        image_threads: int = 4,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.generation_kwargs = generation_kwargs or {}
        self.caption_metrics = caption_metrics
        self.image_threads = image_threads

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        dataset = dataloader.dataset
        if self.caption_metrics and isinstance(dataset, CaptionDataset) and len(dataset):
            from accelerate.utils import gather_object

            prefix = kwargs.get("metric_key_prefix", "eval")
            model = self.accelerator.unwrap_model(self.model)
            captions = generate_captions(
                model,
                dataset,
                self.args.per_device_eval_batch_size,
                self.args.process_index,
                self.args.world_size,
                self.image_threads,
                **self.generation_kwargs,
            )
            if self.args.world_size > 1:
                captions = gather_object(captions)
            predictions = dict(captions)
            order = sorted(predictions)
            scores = score_captions([predictions[i] for i in order], [[dataset.records[i].caption] for i in order])
            output.metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
        return output


# ------------------------------------------------------------------------------------- publishing


def hub_base_model(model_name_or_path: str) -> str | None:
    """Only a Hub id is a valid base_model; a local folder's path means nothing on the Hub."""
    return None if Path(model_name_or_path).exists() else model_name_or_path


def write_model_card(
    output_dir: Path, model_args: GitModelArguments, metrics: dict, report: DataReport, data: dict, state
) -> None:
    """The card states what ran: the data given, the optimizer steps and epochs actually trained (``state``)."""
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-to-text",
        base_model=hub_base_model(model_args.model_name_or_path),
        tags=["medical", "radiology", "image-captioning", "git", "visual-med-alpaca", "research-only"],
    )
    metric_lines = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()))
    content = f"""---
{card_data.to_yaml()}
---

# Med-GIT: radiology captioner

`GitForCausalLM` fine-tuned from `{hub_base_model(model_args.model_name_or_path) or "a local GIT checkpoint"}` on
radiology image captions with `train_git.py` (Visual Med-Alpaca),
{state.global_step} optimizer steps ({state.epoch or 0:.2f} epochs) of {state.train_batch_size} images per device.
It is the radiology visual expert of the Visual Med-Alpaca pipeline: its caption is the text the language model is
given about an image.

> **Research use only.** {DISCLAIMER}

## Use

```python
from transformers import GitForCausalLM, GitProcessor

processor = GitProcessor.from_pretrained("MODEL_DIR")
model = GitForCausalLM.from_pretrained("MODEL_DIR")
pixel_values = processor(images=image, return_tensors="pt").pixel_values
caption = processor.batch_decode(model.generate(pixel_values=pixel_values, max_new_tokens=40),
                                 skip_special_tokens=True)[0]
```

## Training data

`{data["source"]}` ({data["format"]} layout): {report.rows} rows read, {len(report.bad_rows)} skipped as unusable
(missing/unreadable image or empty caption; listed in `bad_rows.json`), image modes normalised:
{dict(report.normalised_modes) or "none"}.

## Evaluation

| metric | value |
|---|---|
{metric_lines or "| (no evaluation run) | |"}

BLEU-4 and ROUGE-L in [0, 1], CIDEr-D on coco-caption's scale (papers print it x100); see `caption_metrics.py`.
"""
    ModelCard(content).save(output_dir / "README.md")


def push_output(output_dir: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the final model folder (no checkpoints, see ``hub_push.PUSH_EXCLUDE``); returns the repository URL."""
    push_folder(
        output_dir,
        repo_id,
        private=private,
        token=token,
        commit_message="Upload Med-GIT (train_git.py)",
        what="trained model",
        api=HfApi(token=token),
    )
    return f"https://huggingface.co/{repo_id}"


@dataclass
class CaptionTrainingResult:
    output_dir: Path
    trainer: CaptionTrainer
    train_metrics: dict
    eval_metrics: dict
    report: DataReport
    hub_url: str | None = None
    push_error: str | None = None


def load_captioner(model_args: GitModelArguments) -> tuple[GitProcessor, GitForCausalLM]:
    processor_source = model_args.processor_name_or_path or model_args.model_name_or_path
    try:
        processor = GitProcessor.from_pretrained(processor_source)
        model = GitForCausalLM.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load a GitProcessor from {processor_source!r} and a GitForCausalLM from "
            f"{model_args.model_name_or_path!r} ({type(error).__name__}): pass a local folder holding both, or a Hub "
            "id that is reachable or already in the Hugging Face cache."
        ) from error
    # GIT must not receive token_type_ids (DESIGN.md §4); microsoft/git-base's tokenizer would emit them.
    processor.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return processor, model


def git_run_settings(model_args: GitModelArguments, data_args: CaptionDataArguments, training_args) -> dict:
    """The settings that decide what a run computes (its fingerprint): model, data, schedule, batch, seed."""
    data = asdict(data_args)
    for unrelated in ("image_threads", "max_bad_fraction", "overwrite_output_dir"):
        data.pop(unrelated)
    return {
        **training_settings(training_args),
        "model": model_args.model_name_or_path,
        "processor": model_args.processor_name_or_path,
        "max_caption_tokens": model_args.max_caption_tokens,
        **data,
        "train_file_sha256": file_digest(data_args.train_file) if data_args.train_file else None,
        "validation_file_sha256": file_digest(data_args.validation_file) if data_args.validation_file else None,
    }


def main(
    model_args: GitModelArguments,
    data_args: CaptionDataArguments,
    training_args: TrainingArguments,
    callbacks: list | None = None,
) -> CaptionTrainingResult:
    # GIT's inputs (pixel_values next to input_ids) must reach the model untouched (DESIGN.md §4).
    training_args.remove_unused_columns = False
    # Pushing happens once, after the final save, so a Hub failure cannot cost the trained model.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    is_main = training_args.process_index == 0
    # Before anything is written: the folder holds this run or nothing, and a resumed checkpoint is this run's.
    run_record = make_run_record(git_run_settings(model_args, data_args, training_args))
    # The main process checks (and with --overwrite_output_dir replaces) the folder before the others look at it.
    with training_args.main_process_first(local=False, desc="checking --output_dir"):
        resume = prepare_run(
            output_dir, run_record, training_args.resume_from_checkpoint, data_args.overwrite_output_dir, is_main
        )

    splits, report = prepare_caption_data(
        data_args, training_args.seed, show_progress=is_main, report_dir=output_dir if is_main else None
    )
    processor, model = load_captioner(model_args)
    train_dataset = CaptionDataset(splits["train"], processor, model_args.max_caption_tokens)
    eval_dataset = (
        CaptionDataset(splits["validation"], processor, model_args.max_caption_tokens)
        if splits.get("validation")
        else None
    )
    if eval_dataset is None and training_args.eval_strategy != "no":
        logger.warning("No validation rows: evaluation is switched off.")
        training_args.eval_strategy = "no"
    if is_main:
        logger.info(
            "Training rows: %d, validation rows: %d, skipped: %d, normalised modes: %s",
            len(train_dataset),
            len(eval_dataset) if eval_dataset else 0,
            len(report.bad_rows),
            dict(report.normalised_modes),
        )

    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CaptionCollator(processor.tokenizer),
        processing_class=processor,
        callbacks=[*(callbacks or []), RunRecordCallback(run_record)],
        generation_kwargs={
            "max_new_tokens": model_args.generation_max_new_tokens,
            "num_beams": model_args.generation_num_beams,
        },
        caption_metrics=model_args.caption_metrics,
        image_threads=data_args.image_threads,
    )
    if resume is not None and is_main:
        logger.info(describe_resume(resume))
    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))  # safetensors weights + config + the GitProcessor
    trainer.save_state()  # trainer_state.json: the steps and epochs that ran (publish_bundle's card reads it)
    train_metrics = dict(train_output.metrics)
    trainer.save_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    if eval_metrics:
        trainer.save_metrics("eval", eval_metrics)

    result = CaptionTrainingResult(output_dir, trainer, train_metrics, eval_metrics, report)
    push_failure = None
    if is_main:
        data = describe_data(data_args)
        write_model_card(output_dir, model_args, eval_metrics, report, data, trainer.state)
        if push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            private = True if training_args.hub_private_repo is None else training_args.hub_private_repo
            try:
                result.hub_url = push_output(output_dir, repo_id, private=private, token=training_args.hub_token)
                logger.info("Pushed to %s", result.hub_url)
            except HubPushError as error:  # the local model is complete and kept; the run still exits non-zero
                push_failure = error
                result.push_error = str(error)
        summary = {
            "world_size": training_args.world_size,
            "base_model": hub_base_model(model_args.model_name_or_path),
            "data": {key: value for key, value in data.items() if key != "local"},
            "optimizer_steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "rows": report.rows,
            "bad_rows": len(report.bad_rows),
            "normalised_modes": dict(report.normalised_modes),
            "train": train_metrics,
            "eval": eval_metrics,
            "hub_url": result.hub_url,
            "push_error": result.push_error,
        }
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log_bad_rows(report)
    if push_failure is not None:
        push_failure.result = result
        raise push_failure
    return result


def log_bad_rows(report: DataReport, limit: int = 50) -> None:
    if not report.bad_rows:
        logger.info("All %d rows were usable.", report.rows)
        return
    logger.warning(
        "Skipped %d of %d rows (%.1f%%); all ids and reasons are in bad_rows.json:",
        len(report.bad_rows),
        report.rows,
        100 * report.bad_fraction,
    )
    for row in report.bad_rows[:limit]:
        logger.warning("  %s [%s]: %s", row.example_id, row.split, row.reason)
    if len(report.bad_rows) > limit:
        logger.warning("  ... and %d more", len(report.bad_rows) - limit)


def parse_args(argv: list[str] | None = None):
    parser = TrlParser((GitModelArguments, CaptionDataArguments, TrainingArguments))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(*parse_args())
    except VisualMedAlpacaError as error:  # bad data or an unloadable model: a clear message, no traceback
        logger.error("%s: %s", type(error).__name__, error)
        sys.exit(error.exit_code)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
