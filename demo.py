"""Offline demo of the whole chain: train Med-GIT and Med-Alpaca, bundle them, load the bundle, ask questions.

    make demo        # or: HF_HUB_OFFLINE=1 .venv/bin/python demo.py

It runs the project's own scripts, in this process, with the arguments it prints:

1. tiny base models of the real architectures (GIT, LLaMA, and a Pix2Struct DePlot chart reader) with
   tokenizers trained in process (the Hub cannot be reached, so ``microsoft/git-base``, a LLaMA base and
   ``google/deplot`` are out of reach; the chart reader's decoder is fitted for a few seconds to DePlot-style
   tables of the shipped charts, so it writes the table format);
2. ``train_git.py --data_dir data/vqa_rad_captions`` fine-tunes the GIT captioner on real VQA-RAD images, each
   paired with a caption written from that image's own VQA-RAD annotations (organ, questions and answers);
3. ``train_sft.py`` fine-tunes the LLaMA with LoRA on ``data/med_alpaca_sample.jsonl``;
4. ``publish_bundle.py`` merges the adapter and writes a Hub repository folder with both experts (verified by
   loading it);
5. ``pipeline(model=folder, trust_remote_code=True)`` answers a question about a real VQA-RAD radiograph,
   a real CT slice in DICOM (pydicom's own test file; its patient fields never reach the prompt) and one of
   the shipped charts (``data/charts``), which the router sends to the chart expert.

The output is a transcript: one line per step (plus the command line it stands for), then the answers.
Everything the scripts themselves print (training logs, library messages) goes to ``logs/`` in the work
folder; progress bars are off.

The results are DEMO WEIGHTS: a minute of CPU training on a few hundred examples teaches the tiny models
the format of captions and answers, not medicine. The same scripts with the commands in the README's
"From the demo to the real system" section build the real system on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent
VQA_RAD = REPO_ROOT / "data" / "vqa_rad_dev"
SFT_SAMPLE = REPO_ROOT / "data" / "med_alpaca_sample.jsonl"
CAPTIONS = REPO_ROOT / "data" / "vqa_rad_captions"  # built by data/vqa_rad_captions/build_captions.py
IMAGE_NAME = "synpic32962.jpg"
CHART = REPO_ROOT / "data" / "charts" / "bar_grid_colour.png"
CHART_QUESTION = "Which group has the highest value in this chart?"
CHART_MAX_PATCHES = 1024  # what the bundle reads charts with (VisualMedAlpacaConfig.chart_max_patches)
SHOWN_TEXT_CHARS = 110  # longer expert texts are cut in the transcript (answers.json has them whole)
DEMO_NOTICE = (
    "DEMO WEIGHTS: tiny models trained for about a minute on a CPU by demo.py. They show the chain, not medical "
    "knowledge; their answers mean nothing."
)
STEPS = 6


class Progress:
    """The transcript: one line per finished step (with the time), and the command line a step stands for."""

    def __init__(self, log_dir: Path) -> None:
        self.start = time.perf_counter()
        self.log_dir = log_dir

    def step(self, number: int, text: str) -> None:
        print(f"[{number}/{STEPS}] {text}  (t={time.perf_counter() - self.start:.0f}s)", flush=True)

    def command(self, script: str, argv: list[str]) -> None:
        print(f"      = python {script} {shlex.join(argv)}", flush=True)

    @contextlib.contextmanager
    def logged(self, name: str):
        """Everything printed inside (scripts' logs, library messages and warnings) goes to ``logs/NAME.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("w", encoding="utf-8") as log:
            # Library loggers hold the stream they were created with: point them at the log for the step too.
            handlers = [
                handler
                for logger_name in ("", "transformers", "datasets", "trl", "peft", "accelerate", "huggingface_hub")
                for handler in logging.getLogger(logger_name).handlers
                if type(handler) is logging.StreamHandler
            ]
            previous = [handler.setStream(log) for handler in handlers]
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield
            finally:
                for handler, stream in zip(handlers, previous, strict=True):
                    handler.setStream(stream)


def quiet_transcript() -> None:
    """Progress bars off everywhere; bitsandbytes' notices a user cannot act on dropped (quiet_libraries.py)."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from quiet_libraries import quiet_library_noise

    quiet_library_noise()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    disable_progress_bars()


def vqa_rad_questions() -> list[dict]:
    return json.loads((VQA_RAD / "questions.json").read_text())


def pydicom_ct() -> Path:
    """A real CT slice shipped inside pydicom's wheel (never its download helper: it would reach the network)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def build_base_models(work: Path) -> tuple[Path, Path, Path, str]:
    """Tiny GIT and LLaMA bases and a tiny DePlot (Pix2Struct) chart reader, saved as checkpoint folders."""
    from tiny_bundle import build_captioner, build_chart_reader, save_tiny_llama

    git_base = work / "git-base"
    model, processor = build_captioner(seed=0, image_size=64, git_hidden=64, git_layers=2)
    model.save_pretrained(git_base)
    processor.save_pretrained(git_base)
    llama_base = save_tiny_llama(work / "llama-base", seed=0, hidden=128, layers=2, heads=4)
    deplot = work / "deplot"
    chart_reader, chart_processor = build_chart_reader(seed=0)
    first, last = fit_chart_reader(chart_reader, chart_processor)
    chart_reader.save_pretrained(deplot)
    chart_processor.save_pretrained(deplot)
    sizes = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model, chart_reader)]
    summary = (
        f"GIT {sizes[0]:.1f}M parameters, LLaMA (hidden 128, 2 layers), DePlot/Pix2Struct {sizes[1]:.2f}M "
        f"(fitted to the {len(chart_tables())} shipped charts' kind and style: loss {first:.2f} -> {last:.2f})"
    )
    return git_base, llama_base, deplot, summary


def chart_tables() -> dict[Path, str]:
    """A DePlot-style linearised table per shipped chart, written from its file name (kind, grid, colours).

    The charts' numbers are not stored with them, so the tiny chart reader learns the table *format* and what
    its file name says about each chart; like the demo captions, it shows the chain, not chart reading.
    """
    tables = {}
    for path in sorted(CHART.parent.glob("*.png")):
        kind, grid, colours = path.stem.split("_")
        grid = "yes" if grid == "grid" else "no"
        tables[path] = f"TITLE | {kind} chart <0x0A> grid | {grid} <0x0A> colours | {colours}"
    return tables


def fit_chart_reader(chart_reader, chart_processor, steps: int = 150, batch_size: int = 8) -> tuple[float, float]:
    """Fits the chart reader's text decoder to ``chart_tables`` (no project script trains DePlot; the demo's stand-in).

    The (random) vision encoder reads each chart once; only the decoder is trained, on those fixed encodings,
    which keeps the fit to seconds.
    """
    import torch
    from PIL import Image

    tables = chart_tables()
    images = [Image.open(path).convert("RGB") for path in tables]
    features = chart_processor(images=images, return_tensors="pt", max_patches=CHART_MAX_PATCHES)
    tokenizer = chart_processor.tokenizer
    labels = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in tables.values()
    ]
    width = max(map(len, labels))
    labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in labels])
    with torch.no_grad():
        encoded = chart_reader.encoder(
            flattened_patches=features["flattened_patches"], attention_mask=features["attention_mask"]
        ).last_hidden_state
    optimizer = torch.optim.AdamW(chart_reader.decoder.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    chart_reader.train()
    losses = []
    for _ in range(steps):
        rows = torch.randperm(len(images), generator=generator)[:batch_size]
        loss = chart_reader(
            encoder_outputs=(encoded[rows],), attention_mask=features["attention_mask"][rows], labels=labels[rows]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    chart_reader.eval()
    return losses[0], losses[-1]


def train_med_git(progress: Progress, git_base: Path, work: Path) -> Path:
    import train_git

    output = work / "med-git"
    argv = [
        "--model_name_or_path", str(git_base),
        "--data_dir", str(CAPTIONS),
        "--output_dir", str(output),
        "--overwrite_output_dir", "true",
        "--num_train_epochs", "15",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "2e-3",
        "--warmup_steps", "5",
        "--max_caption_tokens", "48",
        "--generation_max_new_tokens", "24",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    with progress.logged("train_git"):
        result = train_git.main(*train_git.parse_args(argv))
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    metrics = result.eval_metrics
    scores = ", ".join(
        f"{label} {metrics[key]:.3f}"
        for key, label in (("eval_bleu4", "BLEU-4"), ("eval_rouge_l", "ROUGE-L"), ("eval_cider", "CIDEr"))
        if key in metrics
    )
    progress.step(
        2,
        f"Med-GIT trained (train_git.py, {len(result.trainer.train_dataset)} VQA-RAD images): loss "
        f"{losses[0]:.2f} -> {losses[-1]:.2f}; {len(result.trainer.eval_dataset or [])} held-out images: {scores}",
    )
    progress.command("train_git.py", argv)
    return output


def train_med_alpaca(progress: Progress, llama_base: Path, work: Path) -> Path:
    import train_sft

    output = work / "med-alpaca-lora"
    argv = [
        "--model_name_or_path", str(llama_base),
        "--dataset_name", str(SFT_SAMPLE),
        "--output_dir", str(output),
        "--overwrite_output_dir", "true",
        "--max_length", "256",
        "--max_steps", "600",
        "--per_device_train_batch_size", "8",
        "--effective_batch_size", "8",
        "--learning_rate", "1e-2",
        "--lora_r", "16",
        "--lora_alpha", "32",
        "--gradient_checkpointing", "false",
        "--bf16", "false",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    with progress.logged("train_sft"):
        trainer = train_sft.main(*train_sft.make_parser().parse_args_and_config(argv))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    progress.step(
        3,
        f"Med-Alpaca LoRA trained (train_sft.py, {trainer.state.global_step} steps on "
        f"{len(trainer.train_dataset)} instruction records): loss {losses[0]:.2f} -> {losses[-1]:.2f}",
    )
    progress.command("train_sft.py", argv)
    return output


def publish(progress: Progress, med_git: Path, llama_base: Path, adapter: Path, deplot: Path, bundle: Path) -> Path:
    from publish_bundle import PublishArguments
    from publish_bundle import main as publish_main

    args = PublishArguments(
        captioner_checkpoint=str(med_git),
        language_model=str(llama_base),
        adapter=str(adapter),
        chart_checkpoint=str(deplot),
        output_dir=str(bundle),
        dtype="float32",
        overwrite_output_dir=True,
        card_notice=DEMO_NOTICE,
    )
    with progress.logged("publish_bundle"):
        publish_main(args)
    progress.step(4, f"Bundled (publish_bundle.py: LoRA merged, Med-GIT + DePlot experts, verified) into {bundle}")
    progress.command(
        "publish_bundle.py",
        [
            *("--captioner_checkpoint", args.captioner_checkpoint, "--language_model", args.language_model),
            *("--adapter", args.adapter, "--chart_checkpoint", args.chart_checkpoint),
            *("--output_dir", args.output_dir, "--dtype", "float32"),
            *("--overwrite_output_dir", "true", "--card_notice", DEMO_NOTICE),
        ],
    )
    return bundle


def _shown(text: str | None) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= SHOWN_TEXT_CHARS else text[: SHOWN_TEXT_CHARS - 1] + "…"


def show(record: dict, image: str, question: str) -> None:
    routing = record["routing"] or {}
    print("-" * 78)
    print(f"Image:             {image}")
    print(f"Question:          {question}")
    print(f"Expert:            {record['expert']}  (chosen by: {routing.get('mode')})")
    print(f"Intermediate text: {_shown(record['intermediate_text'])}")
    if record.get("image_metadata"):
        print(f"Image metadata:    {_shown(record['image_metadata'])}")
    print(f"Answer:            {_shown(record['answer'])}")
    if record["warnings"]:
        print(f"Warnings:          {_shown(record['warnings'])}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "build" / "demo"), help="training outputs")
    parser.add_argument("--bundle_dir", default=str(REPO_ROOT / "build" / "demo_bundle"), help="the Hub folder")
    args = parser.parse_args(argv)
    work, bundle = Path(args.work_dir), Path(args.bundle_dir)
    work.mkdir(parents=True, exist_ok=True)

    progress = Progress(work / "logs")
    print(f"Visual Med-Alpaca demo (offline, CPU). Scripts' own output goes to {progress.log_dir}.", flush=True)
    quiet_transcript()
    with progress.logged("base_models"):
        git_base, llama_base, deplot, sizes = build_base_models(work)
    progress.step(1, f"Tiny base models of the real architectures, tokenizers trained here: {sizes}")
    med_git = train_med_git(progress, git_base, work)
    adapter = train_med_alpaca(progress, llama_base, work)
    publish(progress, med_git, llama_base, adapter, deplot, bundle)

    with progress.logged("pipeline"):
        from transformers import pipeline

        vqa = pipeline(model=str(bundle), trust_remote_code=True)
    progress.step(5, f"Loaded like a user: pipeline(model='{bundle}', trust_remote_code=True)")
    image = VQA_RAD / "images" / IMAGE_NAME
    question = next(q["question"] for q in vqa_rad_questions() if q["image_name"] == IMAGE_NAME)
    dicom = pydicom_ct()
    dicom_question = "What body region does this CT slice show?"
    asked = [
        (str(image), question, f"{image.relative_to(REPO_ROOT)} (VQA-RAD, public domain)"),
        (str(dicom), dicom_question, f"{dicom.name} (CT, shipped in pydicom's wheel; patient fields stripped)"),
        (str(CHART), CHART_QUESTION, f"{CHART.relative_to(REPO_ROOT)} (a shipped chart)"),
    ]
    with progress.logged("answers"):
        records = [vqa({"image": path, "question": text}) for path, text, _ in asked]
    experts = ", ".join(f"{r['expert']}" for r in records)
    progress.step(
        6, f"Answered {len(records)} questions: a radiograph, a DICOM CT slice and a chart (experts: {experts})"
    )
    print("\n" + "=" * 78)
    print(DEMO_NOTICE)
    print("=" * 78)
    for record, (_, text, label) in zip(records, asked, strict=True):
        show(record, label, text)
    print("-" * 78)
    print(f"Disclaimer (in every answer record): {records[0]['disclaimer']}")
    answers = work / "answers.json"
    answers.write_text(
        json.dumps([{"question": text, **r} for r, (_, text, _) in zip(records, asked, strict=True)], indent=2)
    )
    print(
        f"Done in {time.perf_counter() - progress.start:.0f}s. Bundle: {bundle} (model card: {bundle / 'README.md'});"
    )
    print(f"answer records: {answers}; scripts' logs: {progress.log_dir}.")
    print("The README's 'From the demo to the real system' runs these scripts on microsoft/git-base and a LLaMA base.")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
