"""Med-GIT training and evaluation-captioning throughput, side by side in one run, on one model.

Images are the real VQA-RAD radiology images shipped in ``data/``, paired with real ROCO captions;
the model is a randomly initialised GIT built from the tiny-bundle recipe at benchmark size.

* training: images/s of ``train_git.main`` (Trainer, per-batch padding, pads masked), data loading included;
* evaluation captions: images/s of ``train_git.generate_captions`` (``--batch_size`` images per
  ``generate``) vs. the original one-image-at-a-time loop (``processor(images=image)`` ->
  ``model.generate(pixel_values=...)`` -> decode, per image), same model and generation settings.
  The captions of both paths are compared; the ratio is printed (target >= 3x).

    python benchmarks/bench_train_git.py            # human-readable lines
    python benchmarks/bench_train_git.py --json     # one JSON object (the last stdout line)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tiny_bundle import ROCO_CAPTIONS_CSV, VQA_RAD_DIR, build_captioner  # noqa: E402


def write_caption_csv(path: Path, images: list[Path], captions: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["id", "name", "caption"])
        writer.writeheader()
        for image, row in zip(images, captions, strict=False):
            writer.writerow({"id": row["id"], "name": image.name, "caption": row["caption"]})
    return path


def original_caption_loop(model, processor, image_paths, **generate_kwargs) -> list[str]:
    """The original Med-GIT captioning pattern: one image per ``generate`` call."""
    captions = []
    for path in image_paths:
        image = Image.open(path).convert("RGB")
        pixel_values = processor(images=image, return_tensors="pt").pixel_values.to(model.device)
        with torch.inference_mode():
            generated = model.generate(pixel_values=pixel_values, **generate_kwargs)
        captions.append(processor.batch_decode(generated, skip_special_tokens=True)[0])
    return captions


def run(args) -> dict:
    from transformers import TrainingArguments

    from train_git import (
        CaptionDataArguments,
        CaptionDataset,
        GitModelArguments,
        generate_captions,
        main,
        read_caption_csv,
    )

    torch.set_num_threads(args.threads)
    images = sorted((VQA_RAD_DIR / "images").glob("*.jpg"))[: args.images]
    with ROCO_CAPTIONS_CSV.open(newline="", encoding="utf-8") as handle:
        captions = [row for _, row in zip(range(len(images)), csv.DictReader(handle), strict=False)]
    work = Path(tempfile.mkdtemp(prefix="bench-train-git-"))
    model, processor = build_captioner(
        seed=0, git_hidden=args.hidden, git_layers=args.layers, image_size=args.image_size
    )
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    train_csv = write_caption_csv(work / "train.csv", images, captions)

    training_args = TrainingArguments(
        output_dir=str(work / "out"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.train_steps,
        learning_rate=5e-5,
        logging_steps=args.train_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    data_args = CaptionDataArguments(train_file=str(train_csv), image_dir=str(VQA_RAD_DIR / "images"))
    result = main(
        GitModelArguments(model_name_or_path=str(work / "model"), caption_metrics=False), data_args, training_args
    )
    train_images_per_s = result.train_metrics["train_samples_per_second"]

    model = result.trainer.model.eval()
    device = model.device
    dataset = CaptionDataset(read_caption_csv(train_csv, VQA_RAD_DIR / "images"), processor)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": 1}
    warmup = [images[0]]
    original_caption_loop(model, processor, warmup, **generate_kwargs)
    generate_captions(model, CaptionDataset(dataset.records[:1], processor), 1, **generate_kwargs)

    # The two paths alternate over chunks of images so that load from other processes hits both alike.
    single, batched, single_s, batched_s = [], [], 0.0, 0.0
    for start in range(0, len(dataset), args.round_size):
        chunk = CaptionDataset(dataset.records[start : start + args.round_size], processor)
        began = time.perf_counter()
        single += original_caption_loop(model, processor, [Path(r.image) for r in chunk.records], **generate_kwargs)
        single_s += time.perf_counter() - began
        began = time.perf_counter()
        batched += [caption for _, caption in generate_captions(model, chunk, args.batch_size, **generate_kwargs)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        batched_s += time.perf_counter() - began
    matches = sum(a == b for a, b in zip(single, batched, strict=True))
    return {
        "device": str(device),
        "model": f"GIT hidden {args.hidden}, {args.layers} layers, image {args.image_size}",
        "images": len(dataset),
        "train_batch_size": args.batch_size,
        "train_steps": args.train_steps,
        "train_images_per_s": round(train_images_per_s, 2),
        "eval_batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "original_loop_images_per_s": round(len(dataset) / single_s, 2),
        "batched_generation_images_per_s": round(len(dataset) / batched_s, 2),
        "batched_vs_original_ratio": round(single_s / batched_s, 2),
        "identical_captions": f"{matches}/{len(dataset)}",
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="VQA-RAD images used (74 shipped)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--round_size", type=int, default=16, help="images per alternation of the two paths")
    parser.add_argument("--train_steps", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared CPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer log lines must not mix with the --json output
        numbers = run(arguments)
    if arguments.json:
        print(json.dumps(numbers))
    else:
        for key, value in numbers.items():
            print(f"{key:34s} {value}")
        print(
            f"batched eval captioning: {numbers['batched_vs_original_ratio']}x the original one-image loop "
            f"({numbers['batched_generation_images_per_s']} vs {numbers['original_loop_images_per_s']} images/s; "
            "target >= 3x)"
        )
