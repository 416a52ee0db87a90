"""Generate the router's chart set (``data/charts/*.png``) and its natural-photo-like negatives.

The PNGs are committed: the router's thresholds are tested on exactly these files, so a change of
matplotlib version cannot silently move the test set. Re-run only to extend the set, then re-check
``tests/test_router.py``::

    .venv/bin/python data/charts/generate_charts.py                  # writes data/charts/ and data/non_medical/
    .venv/bin/python data/charts/generate_charts.py --dry-run        # list what would be written

Charts plot real numbers where the repository has them (VQA-RAD question statistics, ROCO caption
lengths, matplotlib's bundled stock prices) and seeded random data otherwise. The set varies kind
(bar, horizontal bar, stacked bar, line, scatter, box, pie, histogram, area, error bars), grid,
colour vs grayscale, style, size and resolution. The negatives are synthetic "photos": smooth
colourful gradients, blurred colour noise and textured blobs — continuous tone, saturated, no axes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
KINDS = ("bar", "barh", "stacked", "line", "scatter", "box", "pie", "hist", "area", "errorbar")
STYLES = ("default", "ggplot", "seaborn-v0_8-whitegrid", "bmh", "classic", "fivethirtyeight")
SIZES = ((4.0, 3.0, 80), (5.0, 3.5, 72), (3.2, 3.2, 90), (6.0, 3.0, 64))


def real_series() -> dict:
    """Numbers from the repository's real data and matplotlib's bundled sample data."""
    questions = json.loads((DATA / "vqa_rad_dev" / "questions.json").read_text())
    organs = Counter(q["image_organ"] for q in questions)
    question_types = Counter(q["question_type"] for q in questions).most_common(6)
    with (DATA / "roco" / "roco_val_captions.csv").open(newline="", encoding="utf-8") as handle:
        caption_words = [len(row["caption"].split()) for row in itertools.islice(csv.DictReader(handle), 600)]
    stocks_csv = Path(matplotlib.get_data_path()) / "sample_data" / "Stocks.csv"
    with stocks_csv.open() as handle:
        rows = [row for row in csv.DictReader(line for line in handle if not line.startswith("#")) if row["IBM"]]
    ibm = np.array([float(row["IBM"]) for row in rows])
    msft = np.array([float(row["MSFT"]) for row in rows])
    return {
        "organs": (list(organs), list(organs.values())),
        "question_types": ([k for k, _ in question_types], [v for _, v in question_types]),
        "caption_words": np.array(caption_words),
        "stocks": (ibm, msft),
    }


def draw(kind: str, ax, rng: np.random.Generator, real: dict, colours: list) -> None:
    labels, counts = real["question_types"] if rng.random() < 0.5 else real["organs"]
    if kind == "bar":
        ax.bar(labels, counts, color=colours[: len(labels)])
        ax.set_ylabel("questions")
    elif kind == "barh":
        ax.barh(labels, counts, color=colours[0])
        ax.set_xlabel("count")
    elif kind == "stacked":
        groups = ["2019", "2020", "2021", "2022"]
        bottom = np.zeros(len(groups))
        for i in range(3):
            values = rng.integers(5, 30, len(groups))
            ax.bar(groups, values, bottom=bottom, color=colours[i], label=f"arm {i + 1}")
            bottom += values
        ax.legend(fontsize=7)
    elif kind == "line":
        ibm, msft = real["stocks"]
        ax.plot(ibm, color=colours[0], label="IBM")
        ax.plot(msft, color=colours[1], label="MSFT", linestyle="--")
        ax.set_xlabel("month")
        ax.legend(fontsize=7)
    elif kind == "scatter":
        x = rng.normal(50, 12, 80)
        ax.scatter(x, 0.6 * x + rng.normal(0, 6, 80), s=12, color=colours[0])
        ax.set_xlabel("age (years)")
        ax.set_ylabel("score")
    elif kind == "box":
        words = real["caption_words"]
        ax.boxplot([words[:200], words[200:400], words[400:]], tick_labels=["A", "B", "C"])
        ax.set_ylabel("caption words")
    elif kind == "pie":
        ax.pie(counts, labels=labels, colors=colours[: len(labels)], autopct="%1.0f%%", textprops={"fontsize": 7})
    elif kind == "hist":
        ax.hist(real["caption_words"], bins=20, color=colours[0], edgecolor="black" if rng.random() < 0.5 else None)
        ax.set_xlabel("words per ROCO caption")
    elif kind == "area":
        x = np.arange(24)
        ax.fill_between(x, np.cumsum(rng.random(24)), color=colours[0], alpha=0.6)
        ax.set_xlabel("week")
    elif kind == "errorbar":
        x = np.arange(6)
        ax.errorbar(x, rng.random(6) * 10, yerr=rng.random(6), fmt="o-", color=colours[0], capsize=3)
        ax.set_xlabel("dose (mg)")
    ax.set_title(f"Figure {rng.integers(1, 9)}: {kind}", fontsize=9)


def make_chart(index: int, kind: str, grid: bool, grayscale: bool, real: dict, path: Path) -> None:
    rng = np.random.default_rng(index)
    style = STYLES[index % len(STYLES)]
    width, height, dpi = SIZES[index % len(SIZES)]
    with plt.style.context(style):
        if grayscale:
            colours = [str(v) for v in np.linspace(0.15, 0.75, 6)]
        else:
            colours = [plt.get_cmap("tab10")(i) for i in range(10)]
        fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
        draw(kind, ax, rng, real, colours)
        if kind != "pie":
            ax.grid(grid)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    if grayscale:
        Image.open(path).convert("L").save(path, optimize=True)


def make_photo_like(index: int, path: Path, size: int = 256) -> None:
    """A continuous-tone, saturated image with no axes or text: a stand-in for a natural photo."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:size, 0:size] / size
    kind = index % 3
    if kind == 0:  # smooth colourful gradient with soft light
        channels = [np.sin(2 * np.pi * (rng.random() * x + rng.random() * y + rng.random())) for _ in range(3)]
        pixels = np.stack(channels, axis=-1) * 0.5 + 0.5
    elif kind == 1:  # blurred colour noise, like foliage or fur
        coarse = rng.random((size // 8, size // 8, 3))
        pixels = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        pixels = pixels / 255.0
    else:  # textured colour blobs on a graded background
        pixels = np.stack([x, y, 1 - x], axis=-1) * 0.6
        for _ in range(6):
            cx, cy, r = rng.random(), rng.random(), 0.1 + 0.2 * rng.random()
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))[..., None]
            pixels = pixels * (1 - blob) + blob * rng.random(3)
        pixels += rng.normal(0, 0.04, pixels.shape)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    image.save(path, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the files without writing them")
    parser.add_argument("--photos", type=int, default=9, help="number of synthetic photo-like negatives")
    args = parser.parse_args()

    real = real_series()
    jobs = [
        (f"{kind}_{'grid' if grid else 'nogrid'}_{'gray' if gray else 'colour'}.png", kind, grid, gray)
        for kind in KINDS
        for grid in (True, False)
        for gray in (False, True)
    ]
    photos_dir = DATA / "non_medical"
    photos_dir.mkdir(exist_ok=True)
    for index, (name, kind, grid, gray) in enumerate(jobs):
        print(f"[{index + 1}/{len(jobs)}] charts/{name}")
        if not args.dry_run:
            make_chart(index, kind, grid, gray, real, HERE / name)
    for index in range(args.photos):
        print(f"[{index + 1}/{args.photos}] non_medical/photo_like_{index}.jpg")
        if not args.dry_run:
            make_photo_like(index, photos_dir / f"photo_like_{index}.jpg")


if __name__ == "__main__":
    main()
