"""First run: the task form of pipeline(), typed streaming errors, 8-bit loading defaults, quiet libraries."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import raises_typed

from modeling_visual_med_alpaca import UnknownParameterError, int8_default_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def test_the_task_form_loads_the_registered_default_and_the_unregistered_form_fails(bundle_dir):
    """pipeline("visual-med-alpaca", trust_remote_code=True) works once the project's pipeline is imported."""
    code = """
from transformers import pipeline
try:
    pipeline("visual-med-alpaca", trust_remote_code=True)
except KeyError as error:
    print("UNREGISTERED", "Unknown task visual-med-alpaca" in str(error))
import pipeline_vqa  # registers the task with its default (here: a local bundle through the environment)
vqa = pipeline("visual-med-alpaca", trust_remote_code=True)
print("REGISTERED", type(vqa).__name__, vqa({"question": "Q?"}, max_new_tokens=2)["disclaimer"][:13])
"""
    result = _python(code, VISUAL_MED_ALPACA_MODEL=str(bundle_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNREGISTERED True" in result.stdout
    assert "REGISTERED VisualMedAlpacaPipeline Research use" in result.stdout


def test_registered_default_is_the_published_repository_at_a_pinned_revision():
    from transformers.pipelines import PIPELINE_REGISTRY

    import pipeline_vqa

    task = PIPELINE_REGISTRY.supported_tasks[pipeline_vqa.TASK]
    assert task["default"]["model"] == pipeline_vqa.published_default()
    if not os.environ.get("VISUAL_MED_ALPACA_MODEL"):
        assert task["default"]["model"] == (pipeline_vqa.PUBLISHED_MODEL_ID, pipeline_vqa.PUBLISHED_REVISION)
    # A bundle names only its own pipeline class: the default is not written into its config.
    assert set(pipeline_vqa.VisualMedAlpacaPipeline._registered_impl[pipeline_vqa.TASK]) == {"impl", "pt"}


@pytest.mark.parametrize(
    "options",
    [{"num_beams": 2}, {"generate_kwargs": {"num_beams": 3}}, {"num_return_sequences": 2, "do_sample": True}],
)
def test_streaming_refuses_what_it_cannot_serve_with_the_typed_error(vqa, options):
    with raises_typed(UnknownParameterError) as caught:
        next(vqa.stream({"question": "What treats hair loss?"}, **options))
    assert "cannot be streamed" in str(caught.value)


def test_streaming_refuses_a_remote_backend_instead_of_ignoring_it(vqa):
    backend = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    with raises_typed(UnknownParameterError):
        next(vqa.stream({"question": "Q?"}, backend=backend))


def test_8bit_without_dtype_loads_the_unquantised_parts_in_16_bit(bundle_dir):
    from transformers import pipeline

    vqa8 = pipeline(model=str(bundle_dir), trust_remote_code=True, model_kwargs={"load_in_8bit": True})
    model = vqa8.model
    expected = int8_default_dtype()
    assert expected == torch.float16  # no CUDA here
    assert model.captioner.dtype == expected
    assert model.language_model.lm_head.weight.dtype == expected
    assert model.language_model.get_input_embeddings().weight.dtype == expected
    blocks = [m for m in model.language_model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert blocks and all(m.weight.dtype == torch.int8 for m in blocks)
    assert isinstance(vqa8({"question": "Q?"}, max_new_tokens=2)["answer"], str)
    # An explicit dtype is kept.
    vqa8_fp32 = pipeline(
        model=str(bundle_dir), trust_remote_code=True, dtype=torch.float32, model_kwargs={"load_in_8bit": True}
    )
    assert vqa8_fp32.model.captioner.dtype == torch.float32


def test_int8_default_dtype_prefers_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert int8_default_dtype() == torch.bfloat16 and int8_default_dtype("auto") == torch.bfloat16
    assert int8_default_dtype("cpu") == torch.float16 and int8_default_dtype({"": "cpu"}) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert int8_default_dtype("auto") == torch.float16


def test_library_noise_is_dropped_and_real_warnings_still_show(caplog):
    from quiet_libraries import LIBRARY_NOISE, quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()  # idempotent
    caplog.set_level(logging.WARNING)
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    kernels = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(cast.filters) == 1
    cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
    kernels.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
    cast.warning("MatMul8bitLt: a real problem the user must see")
    kernels.warning("Some other bitsandbytes warning")
    logging.getLogger("bitsandbytes").warning("A bitsandbytes warning from its root logger")
    shown = [record.getMessage() for record in caplog.records]
    assert shown == [
        "MatMul8bitLt: a real problem the user must see",
        "Some other bitsandbytes warning",
        "A bitsandbytes warning from its root logger",
    ]
    assert set(LIBRARY_NOISE) == {"bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"}


def test_8bit_answer_through_the_cli_prints_no_library_noise(bundle_dir):
    """The bitsandbytes source still emits these messages (checked), and the CLI's stderr has none of them."""
    import inspect

    import bitsandbytes.autograd._functions as matmul_source

    assert "inputs will be cast from" in inspect.getsource(matmul_source)
    code = (
        "import sys, visual_med_alpaca_cli as cli; "
        f"sys.exit(cli.main(['ask', '--model', {str(bundle_dir)!r}, '--load-in-8bit', '--max-new-tokens', '4', 'Q?']))"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MatMul8bitLt" not in result.stderr and "kernels-community" not in result.stderr
    assert result.stdout.startswith("Answer: ")
