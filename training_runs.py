"""One output folder = one training run: a fingerprint of the settings, checked before training and on resume.

train_git.py and train_sft.py write ``run_fingerprint.json`` (the settings that decide what a run computes: model,
data, schedule, batch, seed ...) into ``--output_dir`` before training and into every ``checkpoint-N/`` they save.

- A non-empty ``--output_dir`` from a different run (or holding checkpoints, or files no run wrote) is refused with
  ``OutputDirError``: its old checkpoints would sit beside the new model and ``--resume_from_checkpoint last`` could
  pick one. ``--overwrite_output_dir`` replaces it, and only if it is a training output.
- ``--resume_from_checkpoint last|PATH`` resumes only from a checkpoint whose fingerprint matches this run's
  (``ResumeMismatchError`` names the settings that differ) and says which checkpoint it resumed from.
- Counters that the Trainer does not restore (TRL's ``num_tokens``) are stored beside the fingerprint in each
  checkpoint and restored on resume, so they continue instead of restarting at 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from modeling_visual_med_alpaca import InputError

RUN_FILE = "run_fingerprint.json"
# Files a transformers/TRL/PEFT training run leaves in its output folder: only such a folder is ever deleted.
TRAINING_OUTPUT_MARKERS = ("trainer_state.json", "training_args.bin", "adapter_config.json", "train_results.json")
# TrainingArguments fields that change what a run computes (not where it logs, saves or evaluates).
TRAINING_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_steps",
    "num_train_epochs",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
    "train_sampling_strategy",
)

logger = logging.getLogger("training_runs")


class OutputDirError(InputError):
    """``--output_dir`` holds another run's output (or files no training run wrote)."""


class ResumeMismatchError(InputError):
    """The checkpoint to resume from was written by a run with other settings, or does not exist."""


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a data file (so an edited file is another run); ``None`` for folders and Hub ids."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_settings(training_args) -> dict:
    return {name: getattr(training_args, name, None) for name in TRAINING_SETTINGS}


def make_run_record(settings: dict) -> dict:
    """``{"fingerprint": short sha256 of the settings, "settings": settings}`` (JSON-safe)."""
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint, "settings": settings}


def read_run_record(folder: str | os.PathLike) -> dict | None:
    try:
        record = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def write_run_record(folder: str | os.PathLike, record: dict, counters: dict | None = None) -> None:
    """Written whole or not at all (a temporary file renamed), so another process never reads half of it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = Path(folder) / f".{RUN_FILE}.{os.getpid()}"
    partial.write_text(json.dumps({**record, "counters": counters or {}}, indent=2))
    os.replace(partial, Path(folder) / RUN_FILE)


def differing_settings(ours: dict, theirs: dict) -> list[str]:
    """Names of the settings that differ, e.g. ``["max_steps (6 there, 2 here)"]``."""
    a, b = ours.get("settings", {}), theirs.get("settings", {})
    keys = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    return [f"{key} ({b.get(key)!r} there, {a.get(key)!r} here)" for key in keys]


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())


def _is_training_output(folder: Path) -> bool:
    return (
        (folder / RUN_FILE).is_file()
        or bool(_checkpoints(folder))
        or any((folder / name).is_file() for name in TRAINING_OUTPUT_MARKERS)
    )


def _resume_requested(value) -> str | None:
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    return "last" if str(value).lower() in ("true", "yes", "last", "latest") else str(value)


def prepare_run(output_dir: str | os.PathLike, record: dict, resume, overwrite: bool, is_main: bool = True):
    """Check ``output_dir`` against this run and pick the checkpoint to resume from (``None``: start fresh).

    Raises ``OutputDirError`` / ``ResumeMismatchError`` with what to do. The main process deletes the folder for
    ``overwrite`` and writes this run's fingerprint; the other processes only check.
    """
    folder = Path(output_dir)
    resume = _resume_requested(resume)
    if resume is not None:
        checkpoint = get_last_checkpoint(str(folder)) if resume == "last" and folder.is_dir() else None
        if resume == "last" and checkpoint is None:
            raise ResumeMismatchError(
                f"--resume_from_checkpoint last: no checkpoint in {folder}. Start without --resume_from_checkpoint, "
                "or point it at a checkpoint-N folder."
            )
        checkpoint = Path(checkpoint or resume)
        if not checkpoint.is_dir():
            raise ResumeMismatchError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
        theirs = read_run_record(checkpoint)
        if theirs is None:
            logger.warning(
                "%s carries no %s (saved by an older version or another tool): it cannot be checked against this "
                "run's settings.",
                checkpoint.name,
                RUN_FILE,
            )
        elif theirs["fingerprint"] != record["fingerprint"]:
            raise ResumeMismatchError(
                f"{checkpoint.name} belongs to a run with other settings: "
                f"{'; '.join(differing_settings(record, theirs))}. Resume with the settings it was trained with, or "
                "start a new run in a new --output_dir."
            )
        if is_main:
            write_run_record(folder, record)
        return str(checkpoint)

    if folder.is_dir() and any(folder.iterdir()):
        theirs = read_run_record(folder)
        checkpoints = _checkpoints(folder)
        if theirs is not None and theirs["fingerprint"] == record["fingerprint"] and not checkpoints:
            pass  # the same run again, with nothing resumable to mix in: its files are replaced
        elif overwrite and _is_training_output(folder):
            if is_main:
                shutil.rmtree(folder)
        elif overwrite:
            raise OutputDirError(
                f"--output_dir {folder} holds files that no training run wrote; --overwrite_output_dir deletes only "
                "training outputs. Pick a new --output_dir."
            )
        elif theirs is not None and theirs["fingerprint"] == record["fingerprint"]:
            raise OutputDirError(
                f"--output_dir {folder} holds checkpoints of this run ({', '.join(checkpoints)}). Continue it with "
                "--resume_from_checkpoint last, or start over with --overwrite_output_dir."
            )
        elif theirs is not None:
            raise OutputDirError(
                f"--output_dir {folder} holds the output of a different run (settings that differ: "
                f"{'; '.join(differing_settings(record, theirs))}). Pick a new --output_dir, or replace it with "
                "--overwrite_output_dir."
            )
        else:
            raise OutputDirError(
                f"--output_dir {folder} is not empty and was not written by this run"
                + (f" (it holds {', '.join(checkpoints)})" if checkpoints else "")
                + ". Pick a new --output_dir, or replace it with --overwrite_output_dir."
            )
    if is_main:
        write_run_record(folder, record)
    return None


def describe_resume(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    state = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step = state.get("global_step")
    return f"Resuming from {checkpoint}" + (f" (optimizer step {step})" if step is not None else "")


def restored_counters(checkpoint: str | None) -> dict:
    record = read_run_record(checkpoint) if checkpoint else None
    return dict((record or {}).get("counters") or {})


class RunRecordCallback(TrainerCallback):
    """Writes the run's fingerprint, plus ``counters()``, into every checkpoint the Trainer saves."""

    def __init__(self, record: dict, counters=None):
        self.record = record
        self.counters = counters or dict

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_run_record(checkpoint, self.record, self.counters())
