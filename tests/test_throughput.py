"""Throughput features of the pipeline: the intermediate-text cache, batch dedupe, length grouping, lazy imports.

Speed itself is measured by ``benchmarks/bench_throughput.py``; these tests check behaviour and equality of paths.
"""

import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from test_pipeline import raises_typed, without_cache_flag

from modeling_visual_med_alpaca import InputError

QUESTIONS = ["Is this normal?", "Which organ is shown?", "Is there a mass?", "What modality is this?", "Any fracture?"]


def fresh_pipeline(vqa, cache_size: int = 8, model=None):
    """A new pipeline over the shared session model (or ``model``), with its own cache."""
    return type(vqa)(
        model=model or vqa.model,
        tokenizer=vqa.tokenizer,
        captioner_processor=vqa.captioner_processor,
        intermediate_cache_size=cache_size,
    )


def count_expert_reads(pipe) -> list[int]:
    """Record how many images each run of the radiology expert reads."""
    expert = pipe.experts["radiology"]
    reads: list[int] = []
    read = expert.read

    def counting_read(features, **kwargs):
        reads.append(len(features))
        return read(features, **kwargs)

    expert.read = counting_read
    return reads


def test_questions_about_one_image_caption_it_once(vqa, radiology_images):
    pipe = fresh_pipeline(vqa)
    reads = count_expert_reads(pipe)
    records = [pipe({"image": str(radiology_images[0]), "question": q}) for q in QUESTIONS[:3]]
    assert [r["intermediate_cached"] for r in records] == [False, True, True]
    assert len({r["intermediate_text"] for r in records}) == 1
    assert reads == [1]
    assert (pipe.intermediate_cache.hits, pipe.intermediate_cache.misses) == (2, 1)
    assert pipe({"question": "What is a stroke?"})["intermediate_cached"] is False  # no image, no cache


def test_same_image_in_one_batch_is_read_once(vqa, radiology_images):
    pipe = fresh_pipeline(vqa)
    reads = count_expert_reads(pipe)
    a, b = str(radiology_images[0]), str(radiology_images[1])
    requests = [{"image": a, "question": QUESTIONS[0]}, {"image": b, "question": QUESTIONS[1]}]
    requests.append({"image": Image.open(a), "question": QUESTIONS[2]})  # same pixels, another container
    records = pipe(requests, batch_size=8)
    assert reads == [2]
    assert [r["intermediate_cached"] for r in records] == [False, False, True]
    assert records[0]["intermediate_text"] == records[2]["intermediate_text"]


def test_cached_answers_equal_uncached_answers(vqa, radiology_images):
    cached, uncached = fresh_pipeline(vqa), fresh_pipeline(vqa, cache_size=0)
    uncached_reads = count_expert_reads(uncached)
    requests = [{"image": str(image), "question": q} for image in radiology_images[:2] for q in QUESTIONS]
    with_cache = cached(requests, batch_size=4, return_prompt=True)
    without_cache = uncached(requests, batch_size=4, return_prompt=True)
    assert [without_cache_flag(r) for r in with_cache] == [without_cache_flag(r) for r in without_cache]
    assert sum(r["intermediate_cached"] for r in with_cache) == len(requests) - 2
    # Disabled: every image is read, nothing is kept or counted, no record says cached.
    assert sum(uncached_reads) == len(requests)
    assert not any(r["intermediate_cached"] for r in without_cache)
    assert len(uncached.intermediate_cache) == 0
    assert (uncached.intermediate_cache.hits, uncached.intermediate_cache.misses) == (0, 0)


def test_cache_is_bounded_least_recently_used_goes(vqa, radiology_images):
    pipe = fresh_pipeline(vqa, cache_size=2)
    a, b, c = (str(path) for path in radiology_images[:3])
    for image in (a, b, a, c):  # a was used after b, so b is the least recently used when c arrives
        pipe({"image": image, "question": QUESTIONS[0]})
    assert len(pipe.intermediate_cache) == 2
    assert pipe({"image": a, "question": QUESTIONS[1]})["intermediate_cached"] is True
    assert pipe({"image": b, "question": QUESTIONS[1]})["intermediate_cached"] is False


def test_other_expert_weights_or_generation_settings_miss(vqa, radiology_images):
    image = {"image": str(radiology_images[0]), "question": QUESTIONS[0]}
    pipe = fresh_pipeline(vqa)
    pipe(image)
    # Other generation settings for the caption: another text, so a miss.
    assert pipe(image, caption_generate_kwargs={"max_new_tokens": 3})["intermediate_cached"] is False
    # The same weights in another model object share the fingerprint; changed weights do not.
    same = fresh_pipeline(vqa, model=copy.deepcopy(vqa.model))
    changed_model = copy.deepcopy(vqa.model)
    with torch.no_grad():
        next(changed_model.captioner.parameters()).add_(0.01)
    changed = fresh_pipeline(vqa, model=changed_model)
    same.intermediate_cache = changed.intermediate_cache = pipe.intermediate_cache
    assert same(image)["intermediate_cached"] is True
    assert changed(image)["intermediate_cached"] is False
    # From the Hub (or its cache) the revision is the bundle's commit: another commit is another revision.
    commits = []
    for commit in ("a" * 40, "b" * 40):
        hub = fresh_pipeline(vqa, model=copy.deepcopy(vqa.model))
        hub.model._bundle_source = {"name_or_path": "org/visual-med-alpaca", "revision": commit}
        hub.intermediate_cache = pipe.intermediate_cache
        commits.append(hub(image)["intermediate_cached"])
    assert commits == [False, False]


def test_other_expert_same_image_misses(chart_vqa, radiology_images):
    pipe = type(chart_vqa)(
        model=chart_vqa.model,
        tokenizer=chart_vqa.tokenizer,
        captioner_processor=chart_vqa.captioner_processor,
        chart_processor=chart_vqa.chart_processor,
        intermediate_cache_size=8,
    )
    image = str(radiology_images[0])
    assert pipe({"image": image, "question": "?", "expert": "radiology"})["intermediate_cached"] is False
    assert pipe({"image": image, "question": "?", "expert": "chart"})["intermediate_cached"] is False
    assert pipe({"image": image, "question": "?!", "expert": "chart"})["intermediate_cached"] is True


def test_dicom_cache_holds_no_identity_and_keys_on_pixels(vqa):
    from pydicom import dcmread
    from test_medical_image import CT_SMALL

    pipe = fresh_pipeline(vqa)
    dataset = dcmread(CT_SMALL)
    encoded = []
    for name in ("QZXNAME^ALICE", "QZXOTHER^BOB"):
        dataset.PatientName, dataset.PatientID = name, name.split("^")[0] + "-ID"
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        encoded.append(buffer.getvalue())
    records = [pipe({"image": data, "question": QUESTIONS[0]}) for data in encoded]
    assert [r["intermediate_cached"] for r in records] == [False, True]  # same pixels, other patient: same key
    stored = json.dumps(list(pipe.intermediate_cache._texts.items()))
    assert "QZX" not in stored and "ALICE" not in stored and "BOB" not in stored


def test_cache_size_is_validated_and_configurable(vqa, bundle_dir):
    from transformers import pipeline

    with raises_typed(InputError, "intermediate_cache_size"):
        fresh_pipeline(vqa, cache_size=-1)
    assert vqa.intermediate_cache.maxsize == vqa.model.config.intermediate_cache_size > 0
    small = pipeline(model=str(bundle_dir), trust_remote_code=True, intermediate_cache_size=3)
    assert small.intermediate_cache.maxsize == 3


def test_grouping_by_length_keeps_order_and_answers_and_cuts_padding(vqa):
    pipe = fresh_pipeline(vqa, cache_size=0)
    long = "Describe in detail every finding of the chest radiograph, including the heart, lungs and bones?"
    requests = [{"question": q} for q in (long, "Why?", long + " Really?", "How?", long + " Now.", "Ok?")]
    prompt_batches: list[list[str]] = []
    answer = pipe._answer

    def recording_answer(prompts, *args, **kwargs):
        prompt_batches.append(list(prompts))
        return answer(prompts, *args, **kwargs)

    pipe._answer = recording_answer
    grouped = pipe(requests, batch_size=2, max_new_tokens=4, return_prompt=True)
    grouped_batches, prompt_batches[:] = list(prompt_batches), []
    ungrouped = pipe(requests, batch_size=2, max_new_tokens=4, return_prompt=True, group_by_length=False)
    ungrouped_batches = list(prompt_batches)
    singles = [pipe(request, max_new_tokens=4, return_prompt=True) for request in requests]
    assert grouped == ungrouped == singles

    def padding(batches):
        lengths = [[len(pipe.tokenizer(p)["input_ids"]) for p in batch] for batch in batches]
        return sum(max(batch) * len(batch) - sum(batch) for batch in lengths)

    assert padding(grouped_batches) < padding(ungrouped_batches)


def test_importing_remote_code_and_entry_points_skips_optional_packages():
    """Optional parts (DICOM decoding, plotting, OpenAI client, Gradio, metrics, datasets) load on first use."""
    script = textwrap.dedent(
        """
        import json, sys
        import modeling_visual_med_alpaca, pipeline_vqa
        import evaluate_vqa, handler, visual_med_alpaca_cli
        optional = ["pydicom", "matplotlib", "openai", "gradio", "pycocoevalcap", "datasets"]
        print(json.dumps(sorted(name for name in optional if name in sys.modules)))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("size", [1.5, "8", True])
def test_cache_size_must_be_an_integer(vqa, size):
    with raises_typed(InputError, "intermediate_cache_size"):
        fresh_pipeline(vqa, cache_size=size)
