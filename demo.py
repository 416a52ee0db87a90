"""Offline demo of the whole chain: train Med-GIT and Med-Alpaca, bundle them, load the bundle, ask questions.

    make demo        # or: HF_HUB_OFFLINE=1 .venv/bin/python demo.py

It runs the project's own scripts, in this process, with the arguments it prints:

1. tiny base models of the real architectures (GIT, LLaMA) with tokenizers trained in process
   (the Hub cannot be reached, so ``microsoft/git-base`` and a LLaMA base are out of reach);
2. ``train_git.py`` fine-tunes the GIT captioner on real VQA-RAD images, each paired with a caption
   written from that image's own VQA-RAD annotations (organ, questions and answers);
3. ``train_sft.py`` fine-tunes the LLaMA with LoRA on ``data/med_alpaca_sample.jsonl``;
4. ``publish_bundle.py`` merges the adapter and writes a Hub repository folder (verified by loading it);
5. ``pipeline(model=folder, trust_remote_code=True)`` answers a question about a real VQA-RAD radiograph
   and about a real CT slice in DICOM (pydicom's own test file; its patient fields never reach the prompt).

The results are DEMO WEIGHTS: a minute of CPU training on a few hundred examples teaches the tiny models
the format of captions and answers, not medicine. The same scripts with the commands in the README's
"From the demo to the real system" section build the real system on a GPU.
"""

from __future__ import annotations

import argparse
import json
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
DEMO_NOTICE = (
    "DEMO WEIGHTS: tiny models trained for about a minute on a CPU by demo.py. They show the chain, not medical "
    "knowledge; their answers mean nothing."
)
STEPS = 6


class Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def step(self, number: int, text: str) -> None:
        print(f"\n[{number}/{STEPS}] {text}  (t={time.perf_counter() - self.start:.0f}s)", flush=True)

    def command(self, script: str, argv: list[str]) -> None:
        print(f"      = python {script} {shlex.join(argv)}", flush=True)


def vqa_rad_questions() -> list[dict]:
    return json.loads((VQA_RAD / "questions.json").read_text())


def pydicom_ct() -> Path:
    """A real CT slice shipped inside pydicom's wheel (never its download helper: it would reach the network)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def build_base_models(work: Path) -> tuple[Path, Path]:
    from tiny_bundle import build_captioner, save_tiny_llama

    git_base = work / "git-base"
    model, processor = build_captioner(seed=0, image_size=64, git_hidden=64, git_layers=2)
    model.save_pretrained(git_base)
    processor.save_pretrained(git_base)
    llama_base = save_tiny_llama(work / "llama-base", seed=0, hidden=128, layers=2, heads=4)
    return git_base, llama_base


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
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    progress.command("train_git.py", argv)
    result = train_git.main(*train_git.parse_args(argv))
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    print(f"      Med-GIT saved to {output}; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    scores = {k: round(v, 3) for k, v in result.eval_metrics.items() if k.startswith("eval_") and "runtime" not in k}
    print(f"      on the {len(result.trainer.eval_dataset or [])} validation images: {scores}")
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
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    progress.command("train_sft.py", argv)
    trainer = train_sft.main(*train_sft.make_parser().parse_args_and_config(argv))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"      LoRA adapter saved to {output}; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return output


def publish(progress: Progress, med_git: Path, llama_base: Path, adapter: Path, bundle: Path) -> Path:
    from publish_bundle import PublishArguments
    from publish_bundle import main as publish_main

    args = PublishArguments(
        captioner_checkpoint=str(med_git),
        language_model=str(llama_base),
        adapter=str(adapter),
        output_dir=str(bundle),
        dtype="float32",
        overwrite_output_dir=True,
        card_notice=DEMO_NOTICE,
    )
    progress.command(
        "publish_bundle.py",
        [
            *("--captioner_checkpoint", args.captioner_checkpoint, "--language_model", args.language_model),
            *("--adapter", args.adapter, "--output_dir", args.output_dir, "--dtype", "float32"),
            *("--overwrite_output_dir", "true", "--card_notice", DEMO_NOTICE),
        ],
    )
    publish_main(args)
    return bundle


def show(record: dict, image: str, question: str) -> None:
    print("-" * 78)
    print(f"Image:             {image}")
    print(f"Question:          {question}")
    print(f"Expert:            {record['expert']}  (routing: {record['routing']})")
    print(f"Intermediate text: {record['intermediate_text']}")
    if record.get("image_metadata"):
        print(f"Image metadata:    {record['image_metadata']}")
    print(f"Answer:            {record['answer']}")
    print(f"Warnings:          {record['warnings'] or 'none'}")
    print(f"Disclaimer:        {record['disclaimer']}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "build" / "demo"), help="training outputs")
    parser.add_argument("--bundle_dir", default=str(REPO_ROOT / "build" / "demo_bundle"), help="the Hub folder")
    args = parser.parse_args(argv)
    work, bundle = Path(args.work_dir), Path(args.bundle_dir)
    work.mkdir(parents=True, exist_ok=True)

    progress = Progress()
    progress.step(1, "Building tiny base models of the real architectures (GIT, LLaMA; tokenizers trained here) ...")
    git_base, llama_base = build_base_models(work)
    progress.step(2, "Training Med-GIT with train_git.py on real VQA-RAD images ...")
    med_git = train_med_git(progress, git_base, work)
    progress.step(3, "Training Med-Alpaca (LoRA) with train_sft.py on data/med_alpaca_sample.jsonl ...")
    adapter = train_med_alpaca(progress, llama_base, work)
    progress.step(4, "Bundling with publish_bundle.py (LoRA merged, remote code, model card, handler) ...")
    publish(progress, med_git, llama_base, adapter, bundle)

    progress.step(5, f"Loading the bundle like a user: pipeline(model='{bundle}', trust_remote_code=True) ...")
    from transformers import pipeline

    vqa = pipeline(model=str(bundle), trust_remote_code=True)
    progress.step(6, "Answering questions about a real radiograph and a real CT slice (DICOM) ...")
    image = VQA_RAD / "images" / IMAGE_NAME
    question = next(q["question"] for q in vqa_rad_questions() if q["image_name"] == IMAGE_NAME)
    dicom = pydicom_ct()
    dicom_question = "What body region does this CT slice show?"
    records = [
        vqa({"image": str(image), "question": question}),
        vqa({"image": str(dicom), "question": dicom_question}),
    ]
    print("\n" + "=" * 78)
    print(DEMO_NOTICE)
    print("=" * 78)
    show(records[0], f"{image.relative_to(REPO_ROOT)} (VQA-RAD, public domain)", question)
    show(records[1], f"{dicom.name} (CT, shipped in pydicom's wheel; patient fields stripped)", dicom_question)
    print("-" * 78)
    answers = work / "answers.json"
    questions = (question, dicom_question)
    answers.write_text(json.dumps([{"question": q, **r} for q, r in zip(questions, records, strict=True)], indent=2))
    print(f"Done in {time.perf_counter() - progress.start:.0f}s. The bundle is in {bundle}; its model card is")
    print(f"{bundle / 'README.md'}; the answer records are in {answers}.")
    print("The README's 'From the demo to the real system' runs these scripts on microsoft/git-base and a LLaMA base.")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
