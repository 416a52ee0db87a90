"""publish_bundle.py: trained parts -> a complete, verified Hub repository folder -> push; loading by repo id."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from hub_push import PUSH_EXCLUDE, HubPushError
from modeling_visual_med_alpaca import ALPACA_CHAT_TEMPLATE, DISCLAIMER, build_inference_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
from pipeline_vqa import RECORD_KEYS  # noqa: E402

LEFTOVERS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


def _leave_training_leftovers(folder: Path) -> None:
    """What a Trainer output folder also holds: none of it may reach the bundle."""
    for name in LEFTOVERS:
        (folder / name).write_bytes(b"leftover")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"leftover")


@pytest.fixture(scope="module")
def trained_parts(tiny_parts, tmp_path_factory):
    """The training scripts' outputs, made from the tiny kit: Med-GIT folder, LM base folder, LoRA adapter folder."""
    from peft import LoraConfig, get_peft_model

    model, llama_tokenizer, git_processor, _ = tiny_parts
    root = tmp_path_factory.mktemp("trained")
    git_dir, base_dir, adapter_dir = root / "med-git", root / "llama-base", root / "med-alpaca-lora"
    model.captioner.save_pretrained(git_dir)
    git_processor.save_pretrained(git_dir)
    base = copy.deepcopy(model.language_model)
    base.save_pretrained(base_dir)
    llama_tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    )
    # LoRA B starts at zero (a no-op merge): give it weights so the merge changes the model.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(adapter_dir)
    state = {"num_train_epochs": 3, "max_steps": 12, "global_step": 12, "epoch": 1.5, "train_batch_size": 4}
    state["log_history"] = [{"loss": 2.5, "learning_rate": 1e-4, "step": 6}, {"loss": 1.25, "learning_rate": 5e-5}]
    _leave_training_leftovers(adapter_dir)
    (adapter_dir / "trainer_state.json").write_text(json.dumps(state))
    _leave_training_leftovers(git_dir)
    return SimpleNamespace(git=git_dir, base=base_dir, adapter=adapter_dir, peft_model=peft_model.eval(), root=root)


def _args(trained, output_dir, **overrides):
    from publish_bundle import PublishArguments

    values = {
        "captioner_checkpoint": str(trained.git),
        "language_model": str(trained.base),
        "adapter": str(trained.adapter),
        "output_dir": str(output_dir),
        "dtype": "float32",
        "max_shard_size": "100KB",
    }
    values.update(overrides)
    return PublishArguments(**values)


@pytest.fixture(scope="module")
def published(trained_parts, tmp_path_factory):
    from publish_bundle import main

    eval_json = trained_parts.root / "eval.json"
    eval_json.write_text(
        json.dumps({"dataset": {"name": "VQA-RAD", "split": "test"}, "metrics": {"closed": {"accuracy": 0.5}}})
    )
    output_dir = tmp_path_factory.mktemp("publish") / "visual-med-alpaca"
    args = _args(trained_parts, output_dir, eval_results_json=str(eval_json), datasets=["org/roco-captions"])
    args.export_language_model = str(output_dir.parent / "med-alpaca-merged")
    return output_dir, main(args)


def test_folder_is_a_complete_hub_repo(published):
    output_dir, result = published
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_visual_med_alpaca.VisualMedAlpacaModel"
    assert config["custom_pipelines"]["visual-med-alpaca"]["impl"] == "pipeline_vqa.VisualMedAlpacaPipeline"
    names = {p.name for p in output_dir.iterdir()}
    assert {"modeling_visual_med_alpaca.py", "pipeline_vqa.py", "medical_image.py", "handler.py"} <= names
    assert {"README.md", "requirements.txt", "tokenizer.json", "model.safetensors.index.json"} <= names
    shards = set(json.loads((output_dir / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and shards <= names  # sharded at --max_shard_size
    assert (output_dir / "captioner" / "processor_config.json").is_file()
    assert not (output_dir / "chart_reader").exists()
    assert (output_dir / "handler.py").read_text() == (REPO_ROOT / "handler.py").read_text()
    # The verification answered through the loaded folder before anything else happened.
    assert [r["expert"] for r in result["verification"]] == ["radiology", None]
    assert all(set(r) == RECORD_KEYS for r in result["verification"])
    assert result["commit_sha"] is None


def test_no_training_leftovers(published):
    from publish_bundle import find_leftovers

    output_dir, _ = published
    files = [p.relative_to(output_dir) for p in output_dir.rglob("*")]
    assert not [f for f in files if f.name in LEFTOVERS or f.name.startswith(("checkpoint-", "adapter_"))]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth")]
    assert find_leftovers(output_dir) == []
    (output_dir / "captioner" / "optimizer.pt").write_bytes(b"x")  # the guard itself finds one
    try:
        assert find_leftovers(output_dir) == [str(Path("captioner") / "optimizer.pt")]
    finally:
        (output_dir / "captioner" / "optimizer.pt").unlink()


def test_merged_weights_equal_the_adapter_model(published, trained_parts, tiny_parts):
    from transformers import AutoModel, AutoTokenizer

    output_dir, _ = published
    bundle = AutoModel.from_pretrained(str(output_dir), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    encoded = tokenizer([build_inference_prompt("Is there a pleural effusion?", "chest x-ray")], return_tensors="pt")
    with torch.no_grad():
        merged = bundle(**encoded).logits
        adapter = trained_parts.peft_model(**encoded).logits
        base = tiny_parts[0].language_model(**encoded).logits
    assert torch.allclose(merged, adapter, atol=1e-4)
    assert (merged - base).abs().max() > 1e-2  # the merge was not a no-op
    # The exported LM alone (for OpenAI-compatible servers) is the same merged model, with the chat template.
    from transformers import AutoModelForCausalLM

    export = output_dir.parent / "med-alpaca-merged"
    with torch.no_grad():
        alone = AutoModelForCausalLM.from_pretrained(str(export))(**encoded).logits
    assert torch.equal(alone, merged)
    assert AutoTokenizer.from_pretrained(str(export)).chat_template == ALPACA_CHAT_TEMPLATE
    # The captioner is the Med-GIT checkpoint, unchanged.
    for name, tensor in tiny_parts[0].captioner.state_dict().items():
        assert torch.equal(bundle.captioner.state_dict()[name], tensor), name


def test_tokenizer_has_pad_token_and_alpaca_chat_template(published):
    from transformers import AutoTokenizer

    output_dir, _ = published
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template == ALPACA_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is a stroke?"}], tokenize=False)
    # BOS first: chat tokenisation adds no special tokens, so the served model sees the pipeline's tokens.
    assert rendered == tokenizer.bos_token + build_inference_prompt("What is a stroke?")


def _pins(requirements_file) -> dict:
    pins = {}
    for line in (REPO_ROOT / requirements_file).read_text().splitlines():
        name, _, version = line.split("#", 1)[0].strip().partition("==")
        if version:
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_endpoint_requirements_are_ranges_holding_both_tested_stacks(published):
    """The endpoint image keeps its own versions where they fit: ranges, each admitting both stacks the tests run."""
    from packaging.requirements import Requirement

    from publish_bundle import ENDPOINT_REQUIREMENTS

    output_dir, _ = published
    lines = [line for line in (output_dir / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    requirements = {Requirement(line).name: Requirement(line).specifier for line in lines}
    assert set(requirements) == set(ENDPOINT_REQUIREMENTS) and "torch" not in requirements
    assert all(str(spec) and "==" not in str(spec) for spec in requirements.values())
    pinned, oldest = _pins("requirements.txt"), _pins("requirements-transformers4.txt")
    for name, spec in requirements.items():
        tested = [stack[name] for stack in (pinned, oldest) if name in stack]
        assert tested and all(spec.contains(version) for version in tested), (name, spec, tested)
    assert not requirements["transformers"].contains("4.50.0")  # below the oldest tested


def test_model_card_metadata_and_sections(published):
    output_dir, _ = published
    card = ModelCard.load(output_dir / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] == "transformers"
    assert data["license"] == "other" and data["license_name"]
    # Both bases are local folders and the captioner records no Hub base: no base model is claimed.
    assert data.get("base_model") is None
    assert data["datasets"] == ["org/roco-captions"]
    assert "medical" in data["tags"]
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == 0.5 and result["dataset"]["name"] == "VQA-RAD"
    text = card.text
    for heading in ("Intended use", "Out-of-scope use", "Limitations and risks", "Training data", "How to load it"):
        assert f"## {heading}" in text
    assert "Any clinical use" in text
    assert text.count(DISCLAIMER) == 2
    assert 'model_kwargs={"load_in_8bit": True}' in text and 'device_map="auto"' in text and "revision=" in text
    # Hyper-parameters from the adapter config and the trainer state; the eval table.
    assert "| r | 8 |" in text and "| lora_alpha | 16 |" in text and "| target_modules | q_proj, v_proj |" in text
    assert "| final_train_loss | 1.25 |" in text and "| None |" not in text and "Datasets: `org/roco-captions`" in text
    # The steps and epochs that ran, not the requested num_train_epochs.
    assert "| global_step | 12 |" in text and "| epochs | 1.5 |" in text and "num_train_epochs" not in text
    assert "ROCO" not in text and "data its checkpoint does not record" in text
    assert "| VQA-RAD | test | closed/accuracy | 0.5 |" in text


def test_existing_output_dir_is_never_clobbered(trained_parts, published, tmp_path):
    from modeling_visual_med_alpaca import InputError
    from publish_bundle import main, prepare_output_dir

    output_dir, _ = published
    with pytest.raises(InputError, match="overwrite_output_dir"):
        main(_args(trained_parts, output_dir))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("keep me")
    with pytest.raises(InputError, match="not deleted"):
        prepare_output_dir(other, overwrite=True)
    assert (other / "thesis.txt").read_text() == "keep me"


def test_merged_language_model_with_chart_reader_in_bfloat16(trained_parts, tmp_path):
    """An already merged LM (no adapter) plus a DePlot checkpoint, saved in bf16."""
    from transformers import AutoModel

    from publish_bundle import main
    from tiny_bundle import build_bundle

    chart_model, _, _, chart_processor = build_bundle(seed=3, with_chart_reader=True)
    chart_dir = tmp_path / "deplot"
    chart_model.chart_reader.save_pretrained(chart_dir)
    chart_processor.save_pretrained(chart_dir)
    output_dir = tmp_path / "bundle"
    args = _args(
        trained_parts, output_dir, adapter=None, chart_checkpoint=str(chart_dir), dtype="bfloat16", max_shard_size="2GB"
    )
    result = main(args)
    assert (output_dir / "chart_reader" / "processor_config.json").is_file()
    assert (output_dir / "model.safetensors").is_file()
    bundle = AutoModel.from_pretrained(str(output_dir), trust_remote_code=True)
    assert bundle.dtype == torch.bfloat16 and bundle.chart_reader is not None
    assert set(bundle.available_experts) == {"radiology", "chart"}
    assert ModelCard.load(output_dir / "README.md").data.base_model is None  # a local DePlot is not google/deplot
    assert len(result["verification"]) == 2


class _RecordingHub:
    """Stands in for HfApi: records the calls; optionally fails like an unreachable Hub."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail:
            raise ConnectionError("Hub unreachable")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(oid="0123456789abcdef0123456789abcdef01234567")


def test_push_is_private_by_default_and_prints_the_pin(published, capsys):
    from publish_bundle import push_bundle

    output_dir, _ = published
    hub = _RecordingHub()
    sha = push_bundle(output_dir, "org/visual-med-alpaca", private=True, commit_message="m", api=hub)
    assert sha == "0123456789abcdef0123456789abcdef01234567"
    assert hub.calls[0] == (
        "create_repo",
        {"repo_id": "org/visual-med-alpaca", "repo_type": "model", "private": True, "exist_ok": True},
    )
    assert hub.calls[1][1]["folder_path"] == str(output_dir)
    assert hub.calls[1][1]["ignore_patterns"] == list(PUSH_EXCLUDE)


def test_main_pushes_only_verified_bundles_and_a_failed_push_keeps_the_folder(
    trained_parts, tmp_path, capsys, monkeypatch
):
    from hub_cli import retry_command_from, run_hf_cli

    from modeling_visual_med_alpaca import InputError
    from publish_bundle import main

    # A train_sft.py adapter names its base: --language_model may then be left out.
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_parts.adapter, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": str(trained_parts.base)})
    )
    output_dir = tmp_path / "bundle"
    with pytest.raises(InputError, match="verified"):
        main(_args(trained_parts, output_dir, repo_id="org/visual-med-alpaca", verify=False))
    assert not output_dir.exists()
    args = _args(trained_parts, output_dir, repo_id="org/visual-med-alpaca", max_shard_size="2GB")
    args.language_model, args.adapter = None, str(adapter)
    hub = _RecordingHub()
    result = main(args, api=hub)
    assert hub.calls[0][1]["private"] is True and len(result["verification"]) == 2
    out = capsys.readouterr().out
    assert f'revision="{result["commit_sha"]}"' in out and 'pipeline(model="org/visual-med-alpaca"' in out
    # The card's loading snippet names the repository; the adapter's local base is named, not its full path.
    card = (output_dir / "README.md").read_text()
    assert 'model="org/visual-med-alpaca"' in card
    assert "| base model | local folder `llama-base` |" in card and str(trained_parts.base) not in card

    failing = tmp_path / "bundle-failing"
    hub = _RecordingHub(True)
    with pytest.raises(HubPushError) as raised:
        main(_args(trained_parts, failing, repo_id="org/visual-med-alpaca", push_retry_wait=0), api=hub)
    assert raised.value.exit_code == 5 and str(failing) in str(raised.value) and "was not changed" in str(raised.value)
    assert len([call for call in hub.calls if call[0] == "create_repo"]) == 3  # a connection error is retried
    assert (failing / "config.json").is_file() and (failing / "README.md").is_file()

    offline = tmp_path / "bundle-offline"  # the real HfApi under HF_HUB_OFFLINE=1, with --no_private
    with pytest.raises(HubPushError, match="OfflineModeIsEnabled") as raised:
        main(_args(trained_parts, offline, repo_id="org/visual-med-alpaca", private=False))
    assert (offline / "config.json").is_file()
    retried = run_hf_cli(retry_command_from(str(raised.value)), monkeypatch)
    assert retried["private"] is False  # the user chose public: the retry keeps it
    assert sorted(retried["uploaded"]) == sorted(str(p.relative_to(offline)) for p in offline.rglob("*") if p.is_file())


def test_card_claims_a_base_model_and_roco_only_where_the_training_run_recorded_them(trained_parts, tmp_path):
    from publish_bundle import captioner_data, default_base_models

    demo_git = tmp_path / "demo-git"  # a train_git.py output from a random local base on the shipped VQA-RAD captions
    demo_git.mkdir()
    summary = {"base_model": None, "data": {"format": "imagefolder", "source": "vqa_rad_captions"}}
    (demo_git / "run_summary.json").write_text(json.dumps(summary))
    demo = _args(trained_parts, tmp_path / "b", captioner_checkpoint=str(demo_git))
    assert default_base_models(demo) == []
    assert captioner_data(demo) == "`vqa_rad_captions` (imagefolder layout)"

    (demo_git / "run_summary.json").write_text(
        json.dumps({"base_model": "microsoft/git-base", "data": {"format": "roco", "source": "roco-dataset"}})
    )
    real = _args(trained_parts, tmp_path / "b", captioner_checkpoint=str(demo_git), chart_checkpoint="google/deplot")
    assert default_base_models(real) == ["microsoft/git-base", "google/deplot"]
    assert "ROCO" in captioner_data(real)


def test_command_line_push_failure_exits_5_and_keeps_the_bundle(trained_parts, tmp_path):
    output_dir = tmp_path / "bundle"
    command = [sys.executable, str(REPO_ROOT / "publish_bundle.py"), "--captioner_checkpoint", str(trained_parts.git)]
    command += ["--language_model", str(trained_parts.base), "--adapter", str(trained_parts.adapter)]
    command += ["--output_dir", str(output_dir), "--dtype", "float32", "--repo_id", "org/visual-med-alpaca"]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "CUDA_VISIBLE_DEVICES": ""}
    command += ["--push_retry_wait", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 5, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "hf upload org/visual-med-alpaca" in result.stderr
    assert "--private" in result.stderr and (output_dir / "config.json").is_file()


def test_quantised_base_is_refused(trained_parts, tmp_path):

    from modeling_visual_med_alpaca import InputError
    from publish_bundle import load_language_model

    quantised = tmp_path / "quantised-base"
    shutil.copytree(trained_parts.base, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="unquantised"):
        load_language_model(str(quantised), str(trained_parts.adapter), torch.float32)


def _populate_hub_cache(cache: Path, repo_id: str, folder: Path, sha: str) -> None:
    """The layout huggingface_hub writes after a download: blobs, snapshots/<sha> symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.write_bytes(path.read_bytes())
        link = repo / "snapshots" / sha / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_pipeline_loads_by_repo_id_and_revision_from_the_hub_cache(bundle_dir, radiology_images, tmp_path):
    sha = "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0"
    hub_cache = tmp_path / "hf_home" / "hub"
    _populate_hub_cache(hub_cache, "org/visual-med-alpaca", bundle_dir, sha)
    script = textwrap.dedent(
        f"""
        import json
        from transformers import pipeline
        vqa = pipeline(model="org/visual-med-alpaca", revision={sha!r}, trust_remote_code=True)
        record = vqa({{"image": {str(radiology_images[0])!r}, "question": "What is seen?"}})
        text_only = vqa({{"question": "What is a stroke?"}})
        unpinned = pipeline(model="org/visual-med-alpaca", trust_remote_code=True)  # refs/main
        print(json.dumps({{"record": record, "text_only": text_only, "source": vqa.model._bundle_source,
                           "main_source": unpinned.model._bundle_source, "module": type(vqa).__module__}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(hub_cache),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    # The expert processors are read from the same repository at the same commit as the weights.
    for source in (payload["source"], payload["main_source"]):
        assert (source["name_or_path"], source["revision"]) == ("org/visual-med-alpaca", sha)
    assert payload["module"].startswith("transformers_modules.")
    assert payload["record"]["expert"] == "radiology" and set(payload["record"]) == RECORD_KEYS
    assert payload["text_only"]["expert"] is None
    # Same answers as the local folder gives.
    from transformers import pipeline

    local = pipeline(model=str(bundle_dir), trust_remote_code=True)
    assert local({"image": str(radiology_images[0]), "question": "What is seen?"}) == payload["record"]


def test_command_line_reports_a_bad_checkpoint_without_a_traceback(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    command = [sys.executable, str(REPO_ROOT / "publish_bundle.py"), "--captioner_checkpoint", str(empty)]
    command += ["--language_model", str(empty), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Med-GIT checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_trainer_state_comes_from_the_latest_numbered_checkpoint(tmp_path):
    from publish_bundle import _trainer_state

    for name, step in (("checkpoint-5", 5), ("checkpoint-10", 10), ("checkpoint-final", 99)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    assert _trainer_state(str(tmp_path)) == {"global_step": 10}
    # The run's own state wins; what ran is reported, not the requested schedule (a --max_steps 6 run says 3 epochs).
    state = {"global_step": 6, "epoch": 0.75, "max_steps": 6, "num_train_epochs": 3}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert _trainer_state(str(tmp_path)) == {"global_step": 6, "epochs": 0.75}
    assert _trainer_state(str(tmp_path / "missing")) == {}


def test_published_handler_serves_from_the_repository_folder_alone(published, radiology_images, tmp_path):
    """As on an endpoint: a fresh process, no checkout importable, handler.py loaded from the bundle folder."""
    output_dir, _ = published
    script = textwrap.dedent(
        f"""
        import base64, importlib.util, json
        assert importlib.util.find_spec("modeling_visual_med_alpaca") is None
        spec = importlib.util.spec_from_file_location("handler", {str(output_dir / "handler.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler = module.EndpointHandler(path={str(output_dir)!r})
        image = base64.b64encode(open({str(radiology_images[0])!r}, "rb").read()).decode()
        parameters = {{"max_new_tokens": 4}}
        good = handler({{"inputs": {{"image": image, "question": "What is seen?"}}, "parameters": parameters}})
        try:
            handler({{"inputs": {{"image": "%%%", "question": "What is seen?"}}}})
            bad = None
        except module.EndpointRequestError as error:  # the toolkit answers it with HTTP 400 {{"error": str(error)}}
            bad = {{"status": error.http_status, "error_type": error.error_type, "error": str(error)}}
        again = handler({{"inputs": "What is a stroke?"}})
        print(json.dumps({{"good": good, "bad": bad, "again": again}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(payload["good"][0]) == RECORD_KEYS and payload["good"][0]["expert"] == "radiology"
    assert (payload["bad"]["status"], payload["bad"]["error_type"]) == (422, "InvalidImageError")
    assert payload["bad"]["error"].startswith("InvalidImageError: ")
    assert payload["again"][0]["expert"] is None
