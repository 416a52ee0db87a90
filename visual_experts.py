"""Visual experts as plug-ins: how each kind of expert turns an image into intermediate text.

Remote code (imported relatively by ``pipeline_vqa.py``): installed packages only.

An expert is described by an entry of ``VisualMedAlpacaConfig.experts`` (its name, ``kind``, the
model class and sub-config, the processor class and subfolder, a prompt). The ``kind`` names one of
the small classes below, which know how to prepare an image, run the expert's ``generate`` and turn
the output into text:

- ``captioner`` — an image-to-text captioner such as GIT (Med-GIT, the radiology expert);
- ``chart_table`` — Pix2Struct/DePlot: renders its header prompt onto the chart with a local font
  (nothing is downloaded) and linearises the emitted table into readable rows.

A new kind of expert is a subclass registered with ``@register_expert_kind("name")``; a new expert of
an existing kind (e.g. a dermatology GIT captioner) is only a config entry. See the README.
"""

from __future__ import annotations

import textwrap
from typing import ClassVar

import torch
from PIL import Image, ImageDraw, ImageFont

try:
    from .modeling_visual_med_alpaca import ModelLoadError
except ImportError:  # imported from a checkout as a top-level module
    from modeling_visual_med_alpaca import ModelLoadError

EXPERT_KINDS: dict[str, type[VisualExpert]] = {}

# DePlot's header prompt (google/deplot model card): the chart reader is asked for the data table.
DEPLOT_HEADER = "Generate underlying data table of the figure below:"
# DePlot writes its table on one line: rows joined by this token, cells by " | ".
DEPLOT_ROW_SEPARATOR = "<0x0A>"


def register_expert_kind(kind: str):
    """Class decorator: make an expert class available to config entries as ``"kind": kind``."""

    def register(cls):
        cls.kind = kind
        EXPERT_KINDS[kind] = cls
        return cls

    return register


class VisualExpert:
    """One visual expert at run time: its config entry, its processor, and the model that holds its weights.

    Subclasses implement ``prepare`` (one image -> tensors with a batch dimension of 1) and ``read``
    (a batch of prepared features -> one text per image).
    """

    kind: ClassVar[str] = ""

    def __init__(self, name: str, spec: dict, processor, model):
        self.name = name
        self.spec = spec
        self.processor = processor
        self.model = model

    @property
    def module(self) -> torch.nn.Module:
        return self.model.expert_module(self.name)

    def prepare(self, image: Image.Image) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read(self, features: list[dict], **generate_kwargs) -> list[str]:
        raise NotImplementedError

    def _generate(self, generate_kwargs: dict, **inputs) -> torch.LongTensor:
        module = self.module
        inputs = {
            key: value.to(device=module.device, dtype=module.dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()
        }
        with torch.no_grad():
            return module.generate(**inputs, **generate_kwargs)


@register_expert_kind("captioner")
class CaptionerExpert(VisualExpert):
    """An image captioner (GIT / Med-GIT): pixel values in, caption out."""

    def prepare(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.processor(images=image, return_tensors="pt").pixel_values}

    def read(self, features: list[dict], **generate_kwargs) -> list[str]:
        generate_kwargs.setdefault(
            "max_new_tokens", self.spec.get("max_new_tokens") or self.model.config.caption_max_new_tokens
        )
        pixel_values = torch.cat([f["pixel_values"] for f in features], dim=0)
        ids = self._generate(generate_kwargs, pixel_values=pixel_values)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


def header_font(size: int = 36) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font: shipped inside the Pillow wheel, so nothing is downloaded."""
    return ImageFont.load_default(size=size)


def render_header(image: Image.Image, header: str, font=None) -> Image.Image:
    """Pix2Struct's header layout (text wrapped at 80 characters, 36 px, 5 px padding, stacked above the
    image at a common width), drawn with a local font instead of the ``Arial.TTF`` transformers downloads.
    """
    font = font or header_font()
    wrapped = "\n".join(textwrap.TextWrapper(width=80).wrap(text=header))
    _, _, text_width, text_height = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), wrapped, font=font)
    header_image = Image.new("RGB", (text_width + 10, text_height + 10), "white")
    ImageDraw.Draw(header_image).text((5, 5), wrapped, fill="black", font=font)

    image = image.convert("RGB")
    width = max(header_image.width, image.width)
    image_height = int(image.height * (width / image.width))
    header_height = int(header_image.height * (width / header_image.width))
    combined = Image.new("RGB", (width, image_height + header_height), "white")
    combined.paste(header_image.resize((width, header_height)), (0, 0))
    combined.paste(image.resize((width, image_height)), (0, header_height))
    return combined


def linearize_table(raw: str) -> str:
    """DePlot's one-line table (``"TITLE | x <0x0A> year | value <0x0A> 2019 | 12.5"``) as readable rows.

    One row per line, cells separated by ``" | "``, blank rows and stray spaces removed.
    """
    text = raw.replace(DEPLOT_ROW_SEPARATOR, "\n")
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


@register_expert_kind("chart_table")
class ChartTableExpert(VisualExpert):
    """Pix2Struct / DePlot: chart in, linearised data table out.

    The header prompt is rendered here with a local font and the image processor is called with
    ``is_vqa=False`` (so it never renders, or downloads a font for, a header itself) and an explicit
    ``max_patches`` (its silent default is 2048).
    """

    @property
    def header(self) -> str:
        return self.spec.get("prompt") or DEPLOT_HEADER

    def prepare(self, image: Image.Image) -> dict[str, torch.Tensor]:
        max_patches = self.spec.get("max_patches") or self.model.config.chart_max_patches
        image_processor = getattr(self.processor, "image_processor", self.processor)
        patches = image_processor(
            images=render_header(image, self.header), is_vqa=False, max_patches=max_patches, return_tensors="pt"
        )
        return {"flattened_patches": patches["flattened_patches"], "attention_mask": patches["attention_mask"]}

    def read(self, features: list[dict], **generate_kwargs) -> list[str]:
        generate_kwargs.setdefault(
            "max_new_tokens", self.spec.get("max_new_tokens") or self.model.config.chart_max_new_tokens
        )
        ids = self._generate(
            generate_kwargs,
            flattened_patches=torch.cat([f["flattened_patches"] for f in features], dim=0),
            attention_mask=torch.cat([f["attention_mask"] for f in features], dim=0),
        )
        return [linearize_table(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def build_experts(model, processors: dict) -> dict[str, VisualExpert]:
    """The run-time experts of a model: one per configured expert whose weights and processor are present."""
    experts = {}
    for name, spec in model.config.experts.items():
        if model.expert_module(name) is None or processors.get(name) is None:
            continue
        kind = spec.get("kind")
        if kind not in EXPERT_KINDS:
            raise ModelLoadError(
                f"Expert '{name}' has kind '{kind}', which is not registered; known kinds: "
                f"{', '.join(sorted(EXPERT_KINDS))}. Register its class with @register_expert_kind."
            )
        experts[name] = EXPERT_KINDS[kind](name, spec, processors[name], model)
    return experts


__all__ = [
    "DEPLOT_HEADER",
    "EXPERT_KINDS",
    "CaptionerExpert",
    "ChartTableExpert",
    "VisualExpert",
    "build_experts",
    "header_font",
    "linearize_table",
    "register_expert_kind",
    "render_header",
]
