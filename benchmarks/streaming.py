"""Streaming vs non-streamed answers, measured side by side in one run on the tiny bundle.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/streaming.py            # table
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/streaming.py --json     # one JSON object

Prints, for the same greedy request: the time of ``vqa(request)``, the total time of
``vqa.stream(request)``, the time until its first text piece, and the ratios. Streaming re-decodes the
whole answer at each token (so the pieces join to exactly the non-streamed answer); this shows what
that costs. Also: a follow-up that reuses the image's intermediate text vs one that re-reads the image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
IMAGE = REPO_ROOT / "data" / "vqa_rad_dev" / "images" / "synpic32962.jpg"


def _median_seconds(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main(repeats: int = 5, max_new_tokens: int = 64, as_json: bool = False) -> dict:
    from tqdm.auto import tqdm
    from transformers import pipeline

    from tiny_bundle import build_bundle, save_bundle

    with tempfile.TemporaryDirectory() as folder:
        bundle = save_bundle(Path(folder) / "bundle", *build_bundle(seed=0))
        vqa = pipeline(model=str(bundle), trust_remote_code=True)
    request = {"image": str(IMAGE), "question": "What abnormality is seen?"}
    options = {"max_new_tokens": max_new_tokens}
    vqa(request, **options)  # warm-up

    def first_piece():
        stream = vqa.stream(request, **options)
        next(stream)
        stream.close()

    described = vqa.describe_image(str(IMAGE))
    history = [{"question": "What abnormality is seen?", "answer": "An opacity."}]
    reuse = {
        "question": "Which side?",
        "history": history,
        **{k: described[k] for k in ("expert", "intermediate_text")},
    }
    reread = {"question": "Which side?", "history": history, "image": str(IMAGE)}
    measures = {
        "call": lambda: vqa(request, **options),
        "stream_total": lambda: list(vqa.stream(request, **options)),
        "stream_first_piece": first_piece,
        "follow_up_reusing_text": lambda: vqa(reuse, **options),
        "follow_up_rereading_image": lambda: vqa(reread, **options),
    }
    seconds = {name: _median_seconds(fn, repeats) for name, fn in tqdm(measures.items(), desc="measuring")}
    result = {
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "seconds": seconds,
        "stream_total_over_call": seconds["stream_total"] / seconds["call"],
        "first_piece_over_call": seconds["stream_first_piece"] / seconds["call"],
        "reuse_over_reread": seconds["follow_up_reusing_text"] / seconds["follow_up_rereading_image"],
    }
    if as_json:
        print(json.dumps(result))
    else:
        for name, value in seconds.items():
            print(f"{name:28s} {value * 1000:8.1f} ms (median of {repeats})")
        for name in ("stream_total_over_call", "first_piece_over_call", "reuse_over_reread"):
            print(f"{name:28s} {result[name]:8.2f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    main(args.repeats, args.max_new_tokens, args.json)
