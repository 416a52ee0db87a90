"""`make demo` end to end: train both parts, bundle them, load the bundle, answer an image and a DICOM question."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from modeling_visual_med_alpaca import DISCLAIMER
from pipeline_vqa import RECORD_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    work, bundle = root / "work", root / "bundle"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "demo.py"), "--work_dir", str(work), "--bundle_dir", str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return work, bundle, completed.stdout + completed.stderr


def test_demo_runs_every_step_through_the_real_scripts(demo_run):
    work, bundle, output = demo_run
    positions = [output.index(f"[{step}/6]") for step in range(1, 7)]
    assert positions == sorted(positions)
    for script in ("train_git.py", "train_sft.py", "publish_bundle.py"):
        assert f"= python {script} " in output
    assert (work / "med-git" / "model.safetensors").is_file()
    assert (work / "med-alpaca-lora" / "adapter_model.safetensors").is_file()
    config = json.loads((bundle / "config.json").read_text())
    assert "auto_map" in config and "custom_pipelines" in config
    assert not list(bundle.glob("**/optimizer.pt")) and not (bundle / "trainer_state.json").exists()


def test_demo_answers_a_radiograph_a_dicom_ct_and_a_chart(demo_run):
    work, bundle, output = demo_run
    records = json.loads((work / "answers.json").read_text())
    assert len(records) == 3
    for record in records:
        assert set(RECORD_KEYS) <= set(record)
        assert isinstance(record["answer"], str) and record["disclaimer"] == DISCLAIMER
    radiograph, dicom, chart = records
    for record in (radiograph, dicom):
        assert record["expert"] == "radiology" and record["intermediate_text"].strip()
    assert dicom["routing"]["mode"] == "dicom"
    assert dicom["image_metadata"]["modality"] == "CT"
    # The shipped chart goes to the chart expert, chosen by the router (not forced), in the bundle's DePlot.
    assert chart["expert"] == "chart" and chart["routing"] == {"expert": "chart", "score": chart["routing"]["score"],
                                                               "mode": "statistics"}  # fmt: skip
    assert isinstance(chart["intermediate_text"], str)
    assert "Image:             data/charts/" in output
    assert (bundle / "chart_reader").is_dir()
    config = json.loads((bundle / "config.json").read_text())
    assert config["chart_config"]["model_type"] == "pix2struct"


def test_demo_prints_a_clean_transcript(demo_run):
    """One line per step (plus its command), then the answers: no progress bars, no library warnings."""
    work, _, output = demo_run
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if "it/s]" in line or "%|" in line or "\r" in line]  # progress bars
    noise = ("Warning", "warn(", "[transformers]", "FutureWarning", "UserWarning", "MatMul8bitLt", "kernels-community")
    assert not [line for line in lines if any(word in line for word in noise)]
    steps = [line for line in lines if line.startswith("[") and "/6] " in line]
    assert [line[:5] for line in steps] == [f"[{n}/6]" for n in range(1, 7)]
    assert len(lines) < 45, output  # a page: the steps, their commands, the three answers
    # What the scripts printed is kept, not lost: their logs.
    assert "'loss'" in (work / "logs" / "train_sft.log").read_text()


def test_demo_weights_are_labelled_and_the_card_carries_the_disclaimer(demo_run):
    _, bundle, output = demo_run
    card = (bundle / "README.md").read_text()
    assert "DEMO WEIGHTS" in card and DISCLAIMER in card
    assert "DEMO WEIGHTS" in output


def test_no_patient_identity_from_the_dicom_file_reaches_the_output(demo_run):
    work, bundle, output = demo_run
    dataset = pydicom.dcmread(CT_SMALL)
    identity = [str(dataset.PatientName), dataset.PatientID, dataset.InstitutionName, dataset.StudyDate]
    assert all(identity)
    texts = [output, (work / "answers.json").read_text()]
    for value in identity:
        for text in texts:
            assert value not in text
