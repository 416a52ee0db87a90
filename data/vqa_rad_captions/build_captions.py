"""Write the Med-GIT caption layout shipped here: one caption per VQA-RAD image, from that image's own annotations.

    python data/vqa_rad_captions/build_captions.py       # rewrites train/ and validation/metadata.csv

An imagefolder-style layout that ``train_git.py --data_dir data/vqa_rad_captions`` reads: ``train/metadata.csv`` and
``validation/metadata.csv`` with ``id,file_name,text``; ``file_name`` points at the images in ``../vqa_rad_dev/images``
(relative to each metadata file), so the images are not stored twice. Each caption is real image-text pairing: the
image's organ and its first two VQA-RAD questions with their answers. The first ``VALIDATION_IMAGES`` images (by
name) are held out for the BLEU-4 / ROUGE-L / CIDEr evaluation.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
VQA_RAD = HERE.parent / "vqa_rad_dev"
ORGANS = {"ABD": "Abdomen", "CHEST": "Chest", "HEAD": "Head"}
VALIDATION_IMAGES = 6
FIELDS = ["id", "file_name", "text"]


def caption_rows() -> list[dict]:
    """``{"id", "file_name", "text"}`` per image, sorted by image name; ``file_name`` relative to a split folder."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for question in json.loads((VQA_RAD / "questions.json").read_text(encoding="utf-8")):
        by_image[question["image_name"]].append(question)
    rows = []
    for index, (name, questions) in enumerate(sorted(by_image.items())):
        organ = ORGANS.get(questions[0]["image_organ"], questions[0]["image_organ"].title())
        facts = "; ".join(f"{q['question'].rstrip('?')}: {q['answer']}" for q in questions[:2])
        rows.append(
            {
                "id": f"vqarad-{index}",
                "file_name": f"../../vqa_rad_dev/images/{name}",
                "text": f"{organ} radiograph. {facts}.",
            }
        )
    return rows


def write_layout(folder: Path = HERE) -> dict[str, Path]:
    rows = caption_rows()
    paths = {}
    for split, part in (("train", rows[VALIDATION_IMAGES:]), ("validation", rows[:VALIDATION_IMAGES])):
        (folder / split).mkdir(parents=True, exist_ok=True)
        paths[split] = folder / split / "metadata.csv"
        with paths[split].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(part)
    return paths


if __name__ == "__main__":
    for split, path in write_layout().items():
        print(f"{split}: {path}")
