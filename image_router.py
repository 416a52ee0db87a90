"""The router: which visual expert reads an image — radiology, chart, or none.

Remote code (imported relatively by ``pipeline_vqa.py``): installed packages only.

The original Visual Med-Alpaca routed images through a type classifier it never published. This one
needs no extra model by default: cheap image statistics separate the two kinds of image the experts
read, measured on the repository's real data (``tests/test_router.py``):

- a chart (bar, line, scatter, box, pie …, colour or grayscale) is mostly *light background* with a
  *spiky* luminance histogram: a handful of exact ink colours, text and lines on white;
- a radiology image (X-ray, CT, MR) is *grayscale* (no colour saturation) and *continuous-tone*: a
  smooth, wide luminance histogram, usually on a dark background;
- anything else (a photo of a cat, a coloured illustration) is neither, and is answered without the
  image, with a warning.

Known limits of the statistics: a black-and-white photograph reads as radiology, a chart drawn on a
dark background does not read as a chart. Callers who know better force an expert
(``expert="chart"``), and users who have one can name any Hugging Face zero-shot image
classification model (e.g. a CLIP checkpoint) in the config (``router_model``) to route with it.

    >>> from image_router import StatisticsRouter
    >>> StatisticsRouter().route(pil_image)
    RoutingDecision(expert='radiology', score=0.97, mode='statistics', scores={...})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:
    from .modeling_visual_med_alpaca import ModelLoadError
except ImportError:  # imported from a checkout as a top-level module
    from modeling_visual_med_alpaca import ModelLoadError

ROUTE_RADIOLOGY = "radiology"
ROUTE_CHART = "chart"
ROUTE_NONE = "none"  # no expert reads the image
MODE_STATISTICS = "statistics"
MODE_ZERO_SHOT = "zero-shot"
MODE_FORCED = "forced"
MODE_DICOM = "dicom"
ROUTER_MODES = (MODE_STATISTICS, MODE_ZERO_SHOT)

# Zero-shot labels: one short description per route; the config may replace them.
DEFAULT_ZERO_SHOT_LABELS = {
    ROUTE_RADIOLOGY: "a radiology image: an X-ray, CT or MRI scan",
    ROUTE_CHART: "a chart or plot of data from a scientific paper",
    ROUTE_NONE: "a photograph of an everyday scene, person or animal",
}


@dataclass(frozen=True)
class RoutingDecision:
    """Which expert reads the image, how sure the router is (0-1), and how it decided."""

    expert: str | None  # an expert name, or None when no expert should read the image
    score: float | None
    mode: str
    scores: dict = field(default_factory=dict)  # per-route scores, for inspection

    def as_record(self) -> dict:
        """The ``routing`` entry of an answer record (plain Python, JSON-ready)."""
        return {"expert": self.expert, "score": self.score, "mode": self.mode}


def _ramp(value: float, low: float, high: float) -> float:
    """0 at ``low``, 1 at ``high``, linear in between (either direction)."""
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def image_statistics(image: Image.Image, max_side: int = 512) -> dict[str, float]:
    """The cheap statistics the router decides on, computed on a nearest-neighbour thumbnail.

    Nearest-neighbour keeps a chart's exact ink colours (a smoothing resize would invent new ones).
    """
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.NEAREST)
    pixels = np.asarray(thumbnail, dtype=np.int16)
    luminance = (pixels @ np.array([299, 587, 114], dtype=np.int32)) // 1000
    histogram = np.bincount(luminance.ravel(), minlength=256) / luminance.size
    nonzero = histogram[histogram > 0]
    dx = np.abs(np.diff(luminance, axis=1))[:-1, :]
    dy = np.abs(np.diff(luminance, axis=0))[:, :-1]
    return {
        # Mean colour saturation: radiology images are grayscale, photos are colourful.
        "saturation": float(((pixels.max(axis=2) - pixels.min(axis=2)) / 255.0).mean()),
        # Luminance-histogram entropy in bits: few ink colours (chart) vs continuous tone (scan, photo).
        "histogram_entropy": float(-(nonzero * np.log2(nonzero)).sum()),
        # Share of near-white pixels: the paper background of a chart.
        "light_background": float((luminance >= 230).mean()),
        # Share of pixels in flat regions: fills and background (charts, padding) vs texture.
        "flat_fraction": float(((dx <= 3) & (dy <= 3)).mean()) if dx.size else 1.0,
    }


class StatisticsRouter:
    """Routes by image statistics alone: no model, deterministic, ~10 ms per image on one CPU core
    (``benchmarks/bench_router.py``).

    Thresholds were set on the repository's data (74 VQA-RAD scans, 40 matplotlib charts, JPEG
    re-compressed charts, synthetic colour photos) with margins on both sides; see the module docstring
    for what they mean.
    """

    mode = MODE_STATISTICS

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def scores(self, image: Image.Image) -> dict[str, float]:
        stats = image_statistics(image)
        # A chart needs both: a light background AND a spiky histogram (geometric mean, so one is not enough).
        background = _ramp(stats["light_background"], 0.15, 0.35)
        few_inks = _ramp(stats["histogram_entropy"], 6.0, 3.0)
        chart = float(np.sqrt(background * few_inks))
        # A scan is grayscale AND continuous-tone (a flat gray square is not a scan).
        grayscale = _ramp(stats["saturation"], 0.08, 0.02)
        continuous = _ramp(stats["histogram_entropy"], 2.0, 3.5)
        radiology = grayscale * continuous * (1.0 - chart)
        return {ROUTE_CHART: chart, ROUTE_RADIOLOGY: radiology, ROUTE_NONE: 1.0 - max(chart, radiology)}

    def route(self, image: Image.Image) -> RoutingDecision:
        scores = self.scores(image)
        if scores[ROUTE_CHART] >= self.threshold:
            route = ROUTE_CHART
        elif scores[ROUTE_RADIOLOGY] >= self.threshold:
            route = ROUTE_RADIOLOGY
        else:
            route = ROUTE_NONE
        return RoutingDecision(
            expert=None if route == ROUTE_NONE else route,
            score=round(scores[route], 4),
            mode=self.mode,
            scores={name: round(value, 4) for name, value in scores.items()},
        )


class ZeroShotRouter:
    """Routes with any Hugging Face zero-shot image classification model (CLIP, SigLIP …).

    ``labels`` maps each route (an expert name, or ``"none"``) to the text the model scores the image
    against; an extra expert is routed to by adding its label.
    """

    mode = MODE_ZERO_SHOT

    def __init__(self, model: str, labels: dict[str, str] | None = None, **pipeline_kwargs):
        from transformers import pipeline

        self.labels = dict(labels or DEFAULT_ZERO_SHOT_LABELS)
        if ROUTE_NONE not in self.labels:
            self.labels[ROUTE_NONE] = DEFAULT_ZERO_SHOT_LABELS[ROUTE_NONE]
        self.classifier = pipeline("zero-shot-image-classification", model=model, **pipeline_kwargs)

    def scores(self, image: Image.Image) -> dict[str, float]:
        candidates = list(self.labels.values())
        results = self.classifier(image.convert("RGB"), candidate_labels=candidates)
        by_label = {result["label"]: float(result["score"]) for result in results}
        return {route: by_label[label] for route, label in self.labels.items()}

    def route(self, image: Image.Image) -> RoutingDecision:
        scores = self.scores(image)
        route = max(scores, key=scores.get)
        return RoutingDecision(
            expert=None if route == ROUTE_NONE else route,
            score=round(scores[route], 4),
            mode=self.mode,
            scores={name: round(value, 4) for name, value in scores.items()},
        )


def build_router(mode: str = MODE_STATISTICS, model: str | None = None, labels: dict | None = None, **kwargs):
    """The router a config asks for: ``statistics`` (default, no model) or ``zero-shot`` (needs ``model``)."""
    if mode == MODE_STATISTICS:
        return StatisticsRouter()
    if mode == MODE_ZERO_SHOT:
        if not model:
            raise ModelLoadError("router_mode='zero-shot' needs router_model: a zero-shot image classification model.")
        return ZeroShotRouter(model, labels=labels, **kwargs)
    raise ModelLoadError(f"router_mode must be one of {', '.join(ROUTER_MODES)}.")


__all__ = [
    "DEFAULT_ZERO_SHOT_LABELS",
    "MODE_DICOM",
    "MODE_FORCED",
    "MODE_STATISTICS",
    "MODE_ZERO_SHOT",
    "ROUTER_MODES",
    "ROUTE_CHART",
    "ROUTE_NONE",
    "ROUTE_RADIOLOGY",
    "RoutingDecision",
    "StatisticsRouter",
    "ZeroShotRouter",
    "build_router",
    "image_statistics",
]
