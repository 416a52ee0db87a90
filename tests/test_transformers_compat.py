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
CHARTS_DIR = REPO_ROOT / "data" / "charts"


@pytest.fixture(scope="module")
def compat_python():
    """The transformers-4.51 environment; built here (pip cache, about 1.5 min) when `make test` has not yet."""
    if not (REPO_ROOT / ".venv-tf451" / ".installed-stamp").is_file():
        subprocess.run(["make", "-C", str(REPO_ROOT), "compat-venv"], check=True, timeout=1200)
    return COMPAT_PYTHON


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def compat_requests(radiology_images):
    return [
        {"question": "What abnormality is seen?", "image_b64": _b64(radiology_images[0])},
        {"question": "Which organ is shown?", "image_b64": _b64(CT_SMALL)},
        {"question": "What is a stroke?", "image_b64": None},
    ]


def _answers_on_both_stacks(compat_python, bundle_dir, requests, workdir: Path) -> tuple[dict, dict]:
    requests_file = workdir / "requests.json"
    requests_file.write_text(json.dumps(requests))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        # Its own copy of the bundle's remote code, away from the pinned stack's module cache.
        "HF_MODULES_CACHE": str(workdir / "modules"),
    }
    run = subprocess.run(
        [str(compat_python), str(SCRIPT), str(bundle_dir), str(requests_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,  # nothing of this checkout importable
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    oldest = json.loads(run.stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(SCRIPT.parent))
    from compat_answers import answer_all

    return oldest, answer_all(str(bundle_dir), requests)


@pytest.fixture(scope="module")
def both_stacks(compat_python, compat_requests, bundle_dir, tmp_path_factory):
    return _answers_on_both_stacks(compat_python, bundle_dir, compat_requests, tmp_path_factory.mktemp("tf451"))


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


def test_the_chart_reader_answers_equal_on_both_stacks(compat_python, chart_bundle_dir, tmp_path_factory):
    """DePlot (Pix2Struct) and its processor, saved by the pinned stack, read a chart alike on transformers 4.51."""
    chart = sorted(CHARTS_DIR.glob("*.png"))[0]
    requests = [{"question": "What is the highest value?", "image_b64": _b64(chart), "expert": "chart"}]
    oldest, pinned = _answers_on_both_stacks(
        compat_python, chart_bundle_dir, requests, tmp_path_factory.mktemp("tf451-chart")
    )
    assert pinned["pipeline"][0]["expert"] == "chart" and pinned["pipeline"][0]["intermediate_text"]
    assert without_cache_flag(oldest["pipeline"][0]) == without_cache_flag(pinned["pipeline"][0])
    assert without_cache_flag(oldest["handler"][0][0]) == without_cache_flag(pinned["handler"][0][0])


@pytest.mark.parametrize("environment", [".venv-tf451", ".venv"])
def test_installing_the_bundle_requirements_keeps_the_environments_stack(
    environment, compat_python, bundle_dir, tmp_path
):
    """The toolkit's entrypoint `pip install`s the repository's requirements.txt into its container: the ranges
    must keep the transformers, torch and accelerate already there (pip's dry-run report lists what it would
    install: only what is missing, bitsandbytes in the 4.51 environment)."""
    report = tmp_path / "report.json"
    run = subprocess.run(
        [str(REPO_ROOT / environment / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet"]
        + ["--report", str(report), "-r", str(bundle_dir / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    would_install = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert not would_install & {"torch", "transformers", "accelerate", "huggingface-hub", "tokenizers", "numpy"}
    assert would_install <= {"bitsandbytes"}
