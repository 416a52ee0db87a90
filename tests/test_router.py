"""The router: thresholds measured on real data shipped in the repository, overrides, zero-shot mode."""

import io
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from conftest import CHARTS_DIR, NON_MEDICAL_DIR, VQA_RAD_IMAGES
from PIL import Image
from test_pipeline import RECORD_KEYS, raises_typed, without_cache_flag

from image_router import (
    DEFAULT_ZERO_SHOT_LABELS,
    StatisticsRouter,
    ZeroShotRouter,
    build_router,
    image_statistics,
)
from modeling_visual_med_alpaca import ModelLoadError, build_inference_prompt
from pipeline_vqa import CHART_FALLBACK_WARNING, NO_EXPERT_WARNING

# The bar: each class routed correctly for at least 95% of its images.
MIN_ACCURACY = 0.95
RADIOLOGY_IMAGES = sorted(VQA_RAD_IMAGES.glob("*.jpg"))
CHART_IMAGES = sorted(CHARTS_DIR.glob("*.png"))
PHOTO_LIKE_IMAGES = sorted(NON_MEDICAL_DIR.glob("*.jpg"))
# A real colour photograph (Grace Hopper) shipped inside matplotlib's wheel: a real "none" case.
REAL_PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _accuracy(router, paths, expected, transform=lambda image: image):
    decisions = [router.route(transform(Image.open(path))) for path in paths]
    return sum(decision.expert == expected for decision in decisions) / len(decisions), decisions


def _as_jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def test_shipped_data_is_the_advertised_set():
    assert len(RADIOLOGY_IMAGES) == 74
    kinds = {path.name.split("_")[0] for path in CHART_IMAGES}
    assert {"bar", "line", "scatter", "box", "pie"} <= kinds
    assert {"grid", "nogrid"} == {path.name.split("_")[1] for path in CHART_IMAGES}
    assert {"colour.png", "gray.png"} == {path.name.split("_")[2] for path in CHART_IMAGES}
    assert any(Image.open(path).mode == "L" for path in CHART_IMAGES)
    assert len(PHOTO_LIKE_IMAGES) >= 3


def test_vqa_rad_images_route_to_radiology():
    accuracy, decisions = _accuracy(StatisticsRouter(), RADIOLOGY_IMAGES, "radiology")
    assert accuracy >= MIN_ACCURACY, accuracy
    assert all(d.mode == "statistics" and 0.0 <= d.score <= 1.0 for d in decisions)


def test_charts_route_to_chart():
    accuracy, _ = _accuracy(StatisticsRouter(), CHART_IMAGES, "chart")
    assert accuracy >= MIN_ACCURACY, accuracy


def test_jpeg_compressed_charts_still_route_to_chart():
    """Figures cut from papers are often JPEGs: compression noise must not turn a chart into a scan."""
    accuracy, _ = _accuracy(StatisticsRouter(), CHART_IMAGES, "chart", transform=_as_jpeg)
    assert accuracy >= MIN_ACCURACY, accuracy


def test_photos_route_to_no_expert():
    accuracy, decisions = _accuracy(StatisticsRouter(), [*PHOTO_LIKE_IMAGES, REAL_PHOTO], None)
    assert accuracy == 1.0, [d.scores for d in decisions]


def test_routing_is_deterministic_and_source_independent():
    router = StatisticsRouter()
    image = Image.open(CHART_IMAGES[0])
    first = router.route(image)
    assert router.route(image) == first
    assert router.route(Image.fromarray(np.asarray(image.convert("RGB")))) == first
    assert set(first.scores) == {"radiology", "chart", "none"}
    assert first.as_record() == {"expert": first.expert, "score": first.score, "mode": "statistics"}


def test_statistics_separate_the_classes():
    """The features mean what the docstring says: scans are gray and continuous-tone, charts light and spiky."""
    scan = image_statistics(Image.open(RADIOLOGY_IMAGES[0]))
    chart = image_statistics(Image.open(CHART_IMAGES[0]))
    photo = image_statistics(Image.open(REAL_PHOTO))
    assert scan["saturation"] < 0.02 < photo["saturation"]
    assert chart["histogram_entropy"] < scan["histogram_entropy"]
    assert chart["light_background"] > scan["light_background"]
    flat_gray = image_statistics(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert StatisticsRouter().route(Image.new("RGB", (64, 64), (128, 128, 128))).expert is None, flat_gray


def test_unknown_router_mode_and_missing_model_are_typed_errors():
    with raises_typed(ModelLoadError, match="router_mode"):
        build_router("magic")
    with raises_typed(ModelLoadError, match="router_model"):
        build_router("zero-shot")


# ---------------------------------------------------------------------------------------- pipeline


def test_pipeline_routes_and_records_the_decision(chart_vqa):
    chart = chart_vqa({"image": str(CHART_IMAGES[0]), "question": "What is the trend?"})
    assert set(chart) == RECORD_KEYS
    assert chart["expert"] == "chart"
    assert chart["routing"]["expert"] == "chart" and chart["routing"]["mode"] == "statistics"
    assert 0.5 <= chart["routing"]["score"] <= 1.0
    scan = chart_vqa({"image": str(RADIOLOGY_IMAGES[0]), "question": "What is seen?"})
    assert scan["expert"] == "radiology" and scan["routing"]["mode"] == "statistics"
    assert chart_vqa({"question": "What is a stroke?"})["routing"] is None


def test_caller_forces_an_expert(chart_vqa):
    forced = chart_vqa({"image": str(RADIOLOGY_IMAGES[0]), "question": "Q"}, expert="chart")
    assert forced["expert"] == "chart"
    assert forced["routing"] == {"expert": "chart", "score": 1.0, "mode": "forced"}
    per_input = chart_vqa({"image": str(CHART_IMAGES[0]), "question": "Q", "expert": "radiology"})
    assert per_input["expert"] == "radiology" and per_input["routing"]["mode"] == "forced"
    skipped = chart_vqa({"image": str(CHART_IMAGES[0]), "question": "Q"}, expert="none", return_prompt=True)
    assert skipped["expert"] is None and skipped["intermediate_text"] is None
    assert skipped["routing"] == {"expert": None, "score": None, "mode": "forced"}


def test_dicom_always_goes_to_radiology(chart_vqa):
    """Even a chart-looking DICOM (a secondary capture) is read by the radiology expert."""
    # The remote-code copy of LoadedImage: the pipeline was loaded through trust_remote_code.
    loaded_image_class = sys.modules[type(chart_vqa).__module__].LoadedImage
    dicom = loaded_image_class(image=Image.open(CHART_IMAGES[0]).convert("RGB"), source_format="DICOM")
    assert dicom.is_dicom
    record = chart_vqa({"image": dicom, "question": "What is seen?"})
    assert record["expert"] == "radiology"
    assert record["routing"] == {"expert": "radiology", "score": 1.0, "mode": "dicom"}


def test_photo_is_answered_without_an_expert_and_says_so(chart_vqa):
    record = chart_vqa({"image": str(REAL_PHOTO), "question": "What is this?"}, return_prompt=True)
    assert record["expert"] is None and record["intermediate_text"] is None
    assert record["routing"]["expert"] is None and record["routing"]["mode"] == "statistics"
    assert NO_EXPERT_WARNING in record["warnings"]
    assert record["prompt"] == build_inference_prompt("What is this?")
    assert record["image_metadata"]["width"] > 0


def test_bundle_without_chart_reader_answers_charts_through_the_captioner(vqa):
    record = vqa({"image": str(CHART_IMAGES[1]), "question": "What is the maximum?"})
    assert record["routing"]["expert"] == "chart"  # the router's decision is kept ...
    assert record["expert"] == "radiology"  # ... and what actually read the image is said
    assert isinstance(record["intermediate_text"], str) and record["intermediate_text"]
    assert CHART_FALLBACK_WARNING in record["warnings"]


def test_mixed_batch_equals_one_at_a_time(chart_vqa):
    requests = [
        {"image": str(CHART_IMAGES[2]), "question": "What is plotted?"},
        {"image": str(RADIOLOGY_IMAGES[3]), "question": "Which organ?"},
        {"image": str(REAL_PHOTO), "question": "What is this?"},
        {"question": "Define atelectasis."},
        {"image": str(CHART_IMAGES[5]), "question": "Which group is largest?"},
    ]
    singles = [chart_vqa(request, return_prompt=True) for request in requests]
    batched = chart_vqa(requests, batch_size=8, return_prompt=True)
    assert [without_cache_flag(r) for r in batched] == [without_cache_flag(r) for r in singles]
    assert [r["expert"] for r in singles] == ["chart", "radiology", None, None, "chart"]


# ---------------------------------------------------------------------------------------- zero-shot


@pytest.fixture(scope="module")
def zero_shot_model_dir(tmp_path_factory):
    from tiny_bundle import save_zero_shot_classifier

    return save_zero_shot_classifier(tmp_path_factory.mktemp("tiny-clip"), list(DEFAULT_ZERO_SHOT_LABELS.values()))


def test_zero_shot_router_with_a_local_model(zero_shot_model_dir):
    router = ZeroShotRouter(str(zero_shot_model_dir))
    image = Image.open(CHART_IMAGES[0]).convert("RGB")
    decision = router.route(image)
    assert decision.mode == "zero-shot"
    assert set(decision.scores) == {"radiology", "chart", "none"}
    assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-3)
    best = max(decision.scores, key=decision.scores.get)
    assert decision.expert == (None if best == "none" else best)
    assert decision.score == decision.scores[best]
    assert router.route(image) == decision


def test_zero_shot_mode_from_the_config(chart_parts, zero_shot_model_dir):
    from pipeline_vqa import VisualMedAlpacaPipeline

    model, tokenizer, git_processor, chart_processor = chart_parts
    config = model.config
    original = (config.router_mode, config.router_model)
    config.router_mode, config.router_model = "zero-shot", str(zero_shot_model_dir)
    try:
        pipe = VisualMedAlpacaPipeline(
            model=model, tokenizer=tokenizer, captioner_processor=git_processor, chart_processor=chart_processor
        )
    finally:
        config.router_mode, config.router_model = original
    assert isinstance(pipe.image_router, ZeroShotRouter)
    # Every configured expert with a router_label is a candidate, plus "none".
    assert set(pipe.image_router.labels) == {"radiology", "chart", "none"}
    record = pipe({"image": str(RADIOLOGY_IMAGES[0]), "question": "What is seen?"})
    assert record["routing"]["mode"] == "zero-shot"
    assert record["expert"] == record["routing"]["expert"]
