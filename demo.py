"""Offline demo: build a bundle of demo weights, load it like a user, ask about a real radiology image.

    make demo        # or: HF_HUB_OFFLINE=1 .venv/bin/python demo.py

The weights are DEMO WEIGHTS: tiny models of the real architectures (Med-GIT = GIT, Med-Alpaca =
LLaMA) with random parameters and tokenizers trained in process, so the answer is not meaningful.
The chain is the real one: image -> Med-GIT caption -> Alpaca prompt -> Med-Alpaca answer, loaded
through ``pipeline(model=folder, trust_remote_code=True)`` exactly as a published bundle is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent
BUNDLE_DIR = REPO_ROOT / "build" / "demo_bundle"
IMAGE = REPO_ROOT / "data" / "vqa_rad_dev" / "images" / "synpic32962.jpg"


def demo_question(image_name: str) -> str:
    questions = json.loads((REPO_ROOT / "data" / "vqa_rad_dev" / "questions.json").read_text())
    return next(q["question"] for q in questions if q["image_name"] == image_name)


def main() -> None:
    from transformers import pipeline

    from tiny_bundle import build_bundle, save_bundle

    print("[1/3] Building the demo bundle (tiny GIT + tiny LLaMA, DEMO WEIGHTS) ...", flush=True)
    save_bundle(BUNDLE_DIR, *build_bundle(seed=0))
    print(f"[2/3] Loading it through pipeline(model={BUNDLE_DIR.relative_to(REPO_ROOT)}, trust_remote_code=True) ...")
    vqa = pipeline(model=str(BUNDLE_DIR), trust_remote_code=True)
    question = demo_question(IMAGE.name)
    print("[3/3] Asking about a real VQA-RAD radiology image ...\n")
    record = vqa({"image": str(IMAGE), "question": question})
    print("=" * 78)
    print("DEMO WEIGHTS - random tiny models: the text below shows the chain, not medical knowledge.")
    print("=" * 78)
    print(f"Image:             {IMAGE.relative_to(REPO_ROOT)} (VQA-RAD, public domain)")
    print(f"Question:          {question}")
    print(f"Expert:            {record['expert']}")
    print(f"Routing:           {record['routing']}")
    print(f"Intermediate text: {record['intermediate_text']}")
    print(f"Answer:            {record['answer']}")
    print(f"Warnings:          {record['warnings'] or 'none'}")
    print(f"Disclaimer:        {record['disclaimer']}")


if __name__ == "__main__":
    main()
