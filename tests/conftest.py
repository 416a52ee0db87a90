"""Shared fixtures: one tiny bundle of the real architectures per test session, saved to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

VQA_RAD_IMAGES = REPO_ROOT / "data" / "vqa_rad_dev" / "images"


@pytest.fixture(scope="session")
def tiny_parts():
    """(model, llama_tokenizer, git_processor, chart_processor) — built once, never mutated by tests."""
    from tiny_bundle import build_bundle

    return build_bundle(seed=0)


@pytest.fixture(scope="session")
def bundle_dir(tiny_parts, tmp_path_factory):
    from tiny_bundle import save_bundle

    return save_bundle(tmp_path_factory.mktemp("bundle") / "visual-med-alpaca", *tiny_parts)


@pytest.fixture(scope="session")
def vqa(bundle_dir):
    """The pipeline loaded the way users load it: by folder, through trust_remote_code."""
    from transformers import pipeline

    return pipeline(model=str(bundle_dir), trust_remote_code=True)


@pytest.fixture(scope="session")
def endpoint_handler(bundle_dir):
    """The bundle's handler.py, found and built the way the Endpoints toolkit does (tests/endpoint_toolkit.py)."""
    from endpoint_toolkit import load_custom_handler

    return load_custom_handler(bundle_dir)


@pytest.fixture(scope="session")
def radiology_images():
    """Real VQA-RAD images shipped in the repository (public domain)."""
    return sorted(VQA_RAD_IMAGES.glob("*.jpg"))[:4]


CHARTS_DIR = REPO_ROOT / "data" / "charts"
NON_MEDICAL_DIR = REPO_ROOT / "data" / "non_medical"


@pytest.fixture(scope="session")
def chart_parts():
    """A tiny bundle with the DePlot chart reader (Pix2Struct) as well."""
    from tiny_bundle import build_bundle

    return build_bundle(seed=0, with_chart_reader=True)


@pytest.fixture(scope="session")
def chart_bundle_dir(chart_parts, tmp_path_factory):
    from tiny_bundle import save_bundle

    return save_bundle(tmp_path_factory.mktemp("chart-bundle") / "visual-med-alpaca", *chart_parts)


@pytest.fixture(scope="session")
def chart_vqa(chart_bundle_dir):
    from transformers import pipeline

    return pipeline(model=str(chart_bundle_dir), trust_remote_code=True)


def run_outside_checkout(script: str, tmp_path: Path) -> dict:
    """Run ``script`` in a fresh Python that cannot import the checkout (a user's machine: remote code comes from
    the bundle, into a modules cache of its own) and return the JSON object its last output line holds."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
