"""A bundle published by the pinned stack answers alike on transformers 4.51 (the Inference Endpoints container's).

The second environment (``make compat-venv``: transformers 4.51.3, huggingface_hub 0.30.2, accelerate 1.6.0, the
CPU torch these machines carry; requirements-transformers4.txt) loads the session's tiny bundle through
``pipeline(model=folder, trust_remote_code=True)`` and through the bundle's ``handler.EndpointHandler`` and answers
image, DICOM and text-only requests; the pinned stack answers the same requests in this process. Greedy decoding
of the same weights: the records must be equal.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from test_pipeline import without_cache_flag

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPAT_PYTHON = REPO_ROOT / ".venv-tf451" / "bin" / "python"
SCRIPT = Path(__file__).with_name("compat_answers.py")
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.fixture(scope="module")
def compat_python():
    """The transformers-4.51 environment; built here (pip cache, about 1.5 min) when `make test` has not yet."""
    if not (REPO_ROOT / ".venv-tf451" / ".installed-stamp").is_file():
        subprocess.run(["make", "-C", str(REPO_ROOT), "compat-venv"], check=True, timeout=1200)
    return COMPAT_PYTHON


@pytest.fixture(scope="module")
def compat_requests(radiology_images, tmp_path_factory):
    requests = [
        {"question": "What abnormality is seen?", "image_b64": base64.b64encode(radiology_images[0].read_bytes())},
        {"question": "Which organ is shown?", "image_b64": base64.b64encode(CT_SMALL.read_bytes())},
        {"question": "What is a stroke?", "image_b64": None},
    ]
    requests = [{**r, "image_b64": r["image_b64"].decode() if r["image_b64"] else None} for r in requests]
    path = tmp_path_factory.mktemp("compat") / "requests.json"
    path.write_text(json.dumps(requests))
    return requests, path


@pytest.fixture(scope="module")
def both_stacks(compat_python, compat_requests, bundle_dir, tmp_path_factory):
    requests, requests_file = compat_requests
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        # Its own copy of the bundle's remote code, away from the pinned stack's module cache.
        "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("tf451-modules")),
    }
    run = subprocess.run(
        [str(compat_python), str(SCRIPT), str(bundle_dir), str(requests_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("tf451-cwd"),  # nothing of this checkout importable
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    oldest = json.loads(run.stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(SCRIPT.parent))
    from compat_answers import answer_all

    pinned = answer_all(str(bundle_dir), requests)
    return oldest, pinned


def test_the_second_environment_really_is_transformers_4_51(both_stacks):
    oldest, pinned = both_stacks
    assert oldest["versions"]["transformers"] == "4.51.3"
    assert pinned["versions"]["transformers"].startswith("5.")
    assert oldest["versions"]["torch"] == pinned["versions"]["torch"]


def test_pipeline_answers_equal_on_both_stacks(both_stacks):
    oldest, pinned = both_stacks
    assert [r["expert"] for r in pinned["pipeline"]] == ["radiology", "radiology", None]
    assert pinned["pipeline"][1]["routing"]["mode"] == "dicom"
    assert [without_cache_flag(r) for r in oldest["pipeline"]] == [without_cache_flag(r) for r in pinned["pipeline"]]


def test_handler_answers_equal_on_both_stacks(both_stacks):
    oldest, pinned = both_stacks
    assert [[without_cache_flag(r) for r in answer] for answer in oldest["handler"]] == [
        [without_cache_flag(r) for r in answer] for answer in pinned["handler"]
    ]
    # The visual-question-answering payload: same answers, same scores (to float rounding of the LM pass).
    for old, new in zip(oldest["handler_vqa_client"], pinned["handler_vqa_client"], strict=True):
        assert old[0]["score"] == pytest.approx(new[0]["score"], rel=1e-4)
        strip = {"score", "intermediate_cached"}
        assert {k: v for k, v in old[0].items() if k not in strip} == {
            k: v for k, v in new[0].items() if k not in strip
        }
