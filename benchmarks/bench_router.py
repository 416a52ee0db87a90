"""How much the router costs next to the expert it routes to, measured side by side in one run.

Routes every shipped VQA-RAD image and chart with the statistics router, then captions the same
images with the radiology expert (Med-GIT architecture; tiny random weights by default, so the
captioner time is a lower bound of a real one), and prints milliseconds per image and their ratio::

    .venv/bin/python benchmarks/bench_router.py
    .venv/bin/python benchmarks/bench_router.py --limit 20 --json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from image_router import StatisticsRouter  # noqa: E402
from tiny_bundle import build_bundle  # noqa: E402
from visual_experts import CaptionerExpert  # noqa: E402


@dataclass
class BenchmarkArguments:
    limit: int = field(default=0, metadata={"help": "images per set (0: all shipped images)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def _time_per_image(function, images, description: str) -> float:
    function(images[0])  # warm-up: first-call allocations are not the steady-state cost
    start = time.perf_counter()
    for image in tqdm(images, desc=description, leave=False):
        function(image)
    return 1000.0 * (time.perf_counter() - start) / len(images)


def main(args: BenchmarkArguments) -> dict:
    paths = sorted((REPO_ROOT / "data" / "vqa_rad_dev" / "images").glob("*.jpg"))
    paths += sorted((REPO_ROOT / "data" / "charts").glob("*.png"))
    if args.limit:
        paths = paths[: args.limit]
    images = [Image.open(path).convert("RGB") for path in paths]

    router = StatisticsRouter()
    model, _, git_processor, _ = build_bundle(seed=0)
    captioner = CaptionerExpert("radiology", model.config.experts["radiology"], git_processor, model)

    router_ms = _time_per_image(router.route, images, "statistics router")
    captioner_ms = _time_per_image(
        lambda image: captioner.read([captioner.prepare(image)]), images, "radiology captioner (tiny)"
    )
    results = {
        "images": len(images),
        "router_ms_per_image": round(router_ms, 2),
        "tiny_captioner_ms_per_image": round(captioner_ms, 2),
        "router_over_tiny_captioner": round(router_ms / captioner_ms, 3),
    }
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:30s} {value}")
    return results


if __name__ == "__main__":
    (benchmark_args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    main(benchmark_args)
