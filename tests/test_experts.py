"""Visual experts: DePlot offline end to end (no download), table linearisation, experts as plug-ins."""

import json

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers.utils.hub
from conftest import CHARTS_DIR, VQA_RAD_IMAGES
from PIL import Image
from safetensors import safe_open
from test_pipeline import RECORD_KEYS, raises_typed

from modeling_visual_med_alpaca import (
    ModelLoadError,
    VisualMedAlpacaConfig,
    VisualMedAlpacaModel,
    int8_quantization_config,
    neutralize_template_markers,
)
from pipeline_vqa import VisualMedAlpacaPipeline
from visual_experts import (
    DEPLOT_HEADER,
    EXPERT_KINDS,
    CaptionerExpert,
    build_experts,
    linearize_table,
    register_expert_kind,
    render_header,
)

CHART = CHARTS_DIR / "bar_grid_colour.png"
SCAN = sorted(VQA_RAD_IMAGES.glob("*.jpg"))[0]


# ---------------------------------------------------------------------------------------- DePlot


@pytest.mark.parametrize(
    ("raw", "rows"),
    [
        (
            "TITLE | Figure 1 <0x0A> year | value <0x0A> 2019 | 12.5 <0x0A> 2020 | 13.1",
            "TITLE | Figure 1\nyear | value\n2019 | 12.5\n2020 | 13.1",
        ),
        ("  Entity |Value<0x0A><0x0A> CT|  3 ", "Entity | Value\nCT | 3"),
        ("a | b\nc | d", "a | b\nc | d"),
        ("", ""),
    ],
)
def test_linearize_table(raw, rows):
    assert linearize_table(raw) == rows


def test_render_header_puts_the_prompt_above_the_chart():
    chart = Image.open(CHART).convert("RGB")
    rendered = render_header(chart, DEPLOT_HEADER)
    assert rendered.width >= chart.width
    header_height = rendered.height - int(chart.height * rendered.width / chart.width)
    assert header_height > 0
    header = np.asarray(rendered.crop((0, 0, rendered.width, header_height)).convert("L"))
    assert header.min() < 100 and header.max() == 255  # dark text on white
    body = rendered.crop((0, header_height, rendered.width, rendered.height))
    assert np.array_equal(np.asarray(body), np.asarray(chart.resize(body.size)))


class _DownloadSpy:
    """Stands in for every way the Hub client or a socket could fetch something; records each attempt."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args[:2], sorted(kwargs)))
        raise OSError("download attempted in an offline test")


@pytest.fixture
def download_spy(monkeypatch):
    spy = _DownloadSpy()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", spy)
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", spy)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    # transformers imported these by name before the test started.
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", spy)
    monkeypatch.setattr(transformers.utils.hub, "snapshot_download", spy)
    monkeypatch.setattr("socket.socket.connect", spy)
    return spy


def test_spy_catches_the_library_font_download(chart_parts, download_spy):
    """Control: transformers' own header rendering reaches for the Hub font, and the spy sees it."""
    image_processor = chart_parts[3].image_processor
    with pytest.raises(OSError, match="download attempted"):
        image_processor(images=Image.open(CHART).convert("RGB"), is_vqa=True, header_text="x", max_patches=16)
    assert download_spy.calls


def test_deplot_end_to_end_offline_downloads_nothing(chart_bundle_dir, download_spy):
    from transformers import pipeline

    vqa = pipeline(model=str(chart_bundle_dir), trust_remote_code=True)
    record = vqa({"image": str(CHART), "question": "Which bar is highest?"}, return_prompt=True)
    assert download_spy.calls == []
    assert set(record) == RECORD_KEYS | {"prompt"}
    assert record["expert"] == "chart" and record["routing"]["expert"] == "chart"
    # The intermediate text is exactly the linearised table the chart reader emitted for this chart.
    expert = vqa.experts["chart"]
    features = expert.prepare(Image.open(CHART).convert("RGB"))
    assert features["flattened_patches"].shape[1] == vqa.model.config.chart_max_patches  # explicit max_patches
    ids = vqa.model.read_charts(features["flattened_patches"], features["attention_mask"])
    table = linearize_table(expert.processor.batch_decode(ids, skip_special_tokens=True)[0])
    assert record["intermediate_text"] == neutralize_template_markers(table)[0]
    assert f"### Input:\n{record['intermediate_text']}\n\n### Response:" in record["prompt"]


def test_chart_features_carry_the_rendered_header(chart_parts):
    model, tokenizer, git_processor, chart_processor = chart_parts
    pipe = VisualMedAlpacaPipeline(
        model=model, tokenizer=tokenizer, captioner_processor=git_processor, chart_processor=chart_processor
    )
    chart = Image.open(CHART).convert("RGB")
    with_header = pipe.experts["chart"].prepare(chart)["flattened_patches"]
    without_header = chart_processor.image_processor(
        images=chart, is_vqa=False, max_patches=model.config.chart_max_patches, return_tensors="pt"
    )["flattened_patches"]
    assert with_header.shape == without_header.shape
    assert not torch.equal(with_header, without_header)


# ---------------------------------------------------------------------------------------- plug-ins


def test_saved_weight_names_are_unchanged(chart_bundle_dir):
    with safe_open(str(chart_bundle_dir / "model.safetensors"), "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert prefixes == {"captioner", "chart_reader", "language_model"}
    config = json.loads((chart_bundle_dir / "config.json").read_text())
    assert config["experts"]["chart"]["prompt"] == DEPLOT_HEADER
    assert (chart_bundle_dir / "chart_reader" / "processor_config.json").exists()
    assert {"image_router.py", "visual_experts.py"} <= {p.name for p in chart_bundle_dir.iterdir()}


def _with_dermatology_expert(tiny_parts, **entry):
    """The tiny bundle's config plus a third expert: a GIT captioner described only by a config entry."""
    model, tokenizer, git_processor, _ = tiny_parts
    config_dict = model.config.to_dict()
    config_dict["experts"] = {
        "dermatology": {
            "kind": "captioner",
            "module": "dermatology_captioner",
            "model_class": "GitForCausalLM",
            "model_config": model.config.captioner_config.to_dict(),
            "processor_class": "GitProcessor",
            "processor_subfolder": "dermatology",
            "prompt": None,
            "router_label": "a close-up photograph of skin",
            **entry,
        }
    }
    torch.manual_seed(1)
    return VisualMedAlpacaModel(VisualMedAlpacaConfig.from_dict(config_dict)).eval(), tokenizer, git_processor


def test_a_third_expert_is_a_config_entry(tiny_parts, tmp_path):
    from transformers import pipeline

    model, tokenizer, git_processor = _with_dermatology_expert(tiny_parts)
    assert model.available_experts == ("radiology", "dermatology")
    assert type(model.dermatology_captioner).__name__ == "GitForCausalLM"
    assert "dermatology_captioner" in int8_quantization_config(["dermatology_captioner"]).llm_int8_skip_modules

    pipe = VisualMedAlpacaPipeline(
        model=model,
        tokenizer=tokenizer,
        captioner_processor=git_processor,
        expert_processors={"dermatology": git_processor},
        task="visual-med-alpaca",
    )
    pipe.save_pretrained(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "dermatology" / "processor_config.json").exists()

    loaded = pipeline(model=str(tmp_path / "bundle"), trust_remote_code=True)
    assert set(loaded.experts) == {"radiology", "dermatology"}
    record = loaded({"image": str(SCAN), "question": "Describe the lesion."}, expert="dermatology")
    assert record["expert"] == "dermatology"
    assert record["routing"] == {"expert": "dermatology", "score": 1.0, "mode": "forced"}
    assert isinstance(record["intermediate_text"], str) and record["intermediate_text"]
    # Its own weights: the text differs from what the radiology captioner says about the same image.
    radiology = loaded({"image": str(SCAN), "question": "Describe the lesion."}, expert="radiology")
    assert record["intermediate_text"] != radiology["intermediate_text"]


def test_a_new_kind_of_expert_is_a_small_registered_class(tiny_parts):
    @register_expert_kind("shouting_captioner")
    class ShoutingCaptioner(CaptionerExpert):
        def read(self, features, **generate_kwargs):
            return [text.upper() for text in super().read(features, **generate_kwargs)]

    try:
        model, tokenizer, git_processor = _with_dermatology_expert(tiny_parts, kind="shouting_captioner")
        pipe = VisualMedAlpacaPipeline(
            model=model,
            tokenizer=tokenizer,
            captioner_processor=git_processor,
            expert_processors={"dermatology": git_processor},
        )
        assert isinstance(pipe.experts["dermatology"], ShoutingCaptioner)
        record = pipe({"image": str(SCAN), "question": "Q"}, expert="dermatology")
        plain = CaptionerExpert("dermatology", model.config.experts["dermatology"], git_processor, model)
        expected = plain.read([plain.prepare(Image.open(SCAN).convert("RGB"))])[0].strip().upper()
        assert record["intermediate_text"] == expected
    finally:
        EXPERT_KINDS.pop("shouting_captioner")


def test_bad_expert_entries_are_typed_errors(tiny_parts):
    model, _, git_processor = _with_dermatology_expert(tiny_parts, kind="no_such_kind")
    with raises_typed(ModelLoadError, match="no_such_kind"):
        build_experts(model, {"radiology": git_processor, "dermatology": git_processor})
    with raises_typed(ModelLoadError, match="NoSuchModel"):
        _with_dermatology_expert(tiny_parts, model_class="NoSuchModel")
    with raises_typed(ModelLoadError, match="lacks"):
        VisualMedAlpacaConfig.from_dict({**tiny_parts[0].config.to_dict(), "experts": {"skin": {"kind": "captioner"}}})


def test_unknown_expert_name_is_rejected(chart_vqa):
    from modeling_visual_med_alpaca import UnknownParameterError

    with raises_typed(UnknownParameterError, match="radiology, chart"):
        chart_vqa({"image": str(SCAN), "question": "Q"}, expert="dermatology")
