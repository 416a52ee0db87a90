"""train_sft.py on a tiny LLaMA (CPU): masking, LoRA, merge, 8/4-bit, validation, resume, NaN stop, push, DDP."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_push import PUSH_EXCLUDE, HubPushError
from med_alpaca_data import (
    SAMPLE_PATH,
    TrainingDataError,
    load_instruction_records,
    read_instruction_records,
    to_prompt_completion,
    validate_instruction_records,
    write_jsonl,
)
from modeling_visual_med_alpaca import DISCLAIMER, build_training_prompt
from train_sft import (
    PackedRowsCollator,
    TrainingRunError,
    cpu_has_native_bf16,
    main,
    make_parser,
    push_to_hub,
    resolve_packing,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_bundle import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "llama")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """24 real sample records: small enough to memorise in a few steps, so the loss must fall."""
    records = load_instruction_records(str(SAMPLE_PATH))[:24]
    return write_jsonl(records, tmp_path_factory.mktemp("data") / "train.jsonl")


def parse(model_dir, data_file, output_dir, *extra):
    argv = [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data_file),
        "--output_dir", str(output_dir),
        "--max_length", str(MAX_LENGTH),
        "--per_device_train_batch_size", "4",
        "--effective_batch_size", "4",
        "--gradient_checkpointing", "false",
        "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1",
        "--save_steps", "2",
        "--seed", "0",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip
    return make_parser().parse_args_and_config(argv)


def tiny_prompt_ids(tokenizer):
    prompt = build_training_prompt("Is there a pneumothorax?", "Options: yes, no")
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


class FakeHfApi:
    """Records calls like HfApi would receive them; fails the first ``failures`` uploads."""

    def __init__(self, failures=0):
        self.failures = failures
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.created.append({"repo_id": repo_id, "private": private})

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("hub unreachable")
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.uploads.append({"repo_id": repo_id, "files": files, "ignore_patterns": ignore_patterns})
        return type("Commit", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, train_file, tmp_path_factory):
    """One LoRA run with --merge --push_to_hub against a fake HfApi (the Hub is unreachable)."""
    import train_sft

    output_dir = tmp_path_factory.mktemp("lora") / "run"
    fake_api = FakeHfApi(failures=1)
    real_api = train_sft.HfApi
    train_sft.HfApi = lambda token=None: fake_api
    try:
        trainer = main(
            *parse(
                tiny_llama_dir, train_file, output_dir,
                "--max_steps", "10", "--packing", "true", "--merge", "--merge_dtype", "float32",
                "--push_to_hub", "--hub_model_id", "me/med-alpaca-tiny", "--push_retry_wait", "0",
            )
        )  # fmt: skip
    finally:
        train_sft.HfApi = real_api
    return trainer, output_dir, fake_api


def test_loss_falls(lora_run):
    trainer, _, _ = lora_run
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_completion_only_loss_masks_prompt_tokens(tiny_llama_dir, train_file, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # Records whose prompt fills max_length would be dropped by SFTTrainer; validation drops them first.
    records, _ = validate_instruction_records(load_instruction_records(str(train_file)), tokenizer, MAX_LENGTH, 1.0)
    records = records[:8]
    for train_on_inputs in (False, True):
        script_args, training_args, model_args = parse(
            tiny_llama_dir, train_file, tmp_path / str(train_on_inputs), "--packing", "false", "--max_steps", "1"
        )
        training_args.completion_only_loss = not train_on_inputs
        from datasets import Dataset

        from train_sft import MedAlpacaSFTTrainer

        trainer = MedAlpacaSFTTrainer(
            model=str(tiny_llama_dir),
            args=training_args,
            train_dataset=Dataset.from_list([to_prompt_completion(r) for r in records]),
            processing_class=tokenizer,
        )
        for record, row in zip(records, trainer.train_dataset, strict=True):
            prompt_length = len(tokenizer(build_training_prompt(record["instruction"], record["input"]))["input_ids"])
            labels, input_ids = row["labels"], row["input_ids"]
            if train_on_inputs:
                assert labels == input_ids
            else:
                assert all(label == -100 for label in labels[:prompt_length])
                assert labels[prompt_length:] == input_ids[prompt_length:]
                if len(input_ids) < MAX_LENGTH:  # not truncated: the model learns to stop
                    assert input_ids[-1] == labels[-1] == tokenizer.eos_token_id


def test_packed_rows_train_on_completions_only(lora_run):
    trainer, _, _ = lora_run
    rows = trainer.train_dataset
    assert "seq_lengths" in rows.column_names  # packed (asked for; the default with flash attention)
    for row in rows:
        assert any(label != -100 for label in row["labels"])
        assert sum(label != -100 for label in row["labels"]) < len(row["input_ids"])


def test_packed_rows_keep_records_apart(lora_run, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    trainer, _, _ = lora_run
    assert isinstance(trainer.data_collator, PackedRowsCollator)  # sdpa: rows, not one flattened sequence
    first, second = [1, 10, 11, 12, 13], [1, 20, 21, 22]
    batch = PackedRowsCollator(pad_token_id=3)(
        [
            {"input_ids": first + second, "labels": first + second, "seq_lengths": [5, 4]},
            {"input_ids": second, "labels": second, "seq_lengths": [4]},
        ]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [
        [-100, 10, 11, 12, 13, -100, 20, 21, 22],
        [-100, 20, 21, 22, -100, -100, -100, -100, -100],
    ]
    # The logged token count covers every row of a packed batch.
    counted = trainer._total_train_tokens
    trainer.model.train()
    trainer.compute_loss(trainer.model, {key: value.clone() for key, value in batch.items()})
    assert trainer._total_train_tokens - counted == batch["input_ids"].numel()

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not read packing from position_ids.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone_first = model(input_ids=torch.tensor([first])).logits[0]
        alone_second = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(packed[0, :5], alone_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 5:], alone_second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :4], alone_second, atol=1e-5, rtol=1e-5)


def test_default_batching_packs_only_with_varlen_attention(tiny_llama_dir, train_file, tmp_path):
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--model_name_or_path", str(tiny_llama_dir), "--output_dir", str(tmp_path)]
    )
    assert training_args.packing is None and training_args.train_sampling_strategy == "group_by_length"
    assert training_args.pad_to_multiple_of == 8
    # No GPU here: bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), else float32.
    assert training_args.bf16 is cpu_has_native_bf16()
    assert resolve_packing(training_args, model_args) is False  # sdpa: length-grouped rows, not packed ones
    training_args.packing, model_args.attn_implementation = None, "flash_attention_2"
    assert resolve_packing(training_args, model_args) is True  # varlen kernels: packed
    training_args.packing, model_args.attn_implementation = False, "flash_attention_2"
    assert resolve_packing(training_args, model_args) is False  # an explicit flag wins


def test_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(lora_run):
    """The CPU switch to compact scoring changes which positions are projected, not the loss or the gradients."""
    import train_sft

    trainer, _, _ = lora_run
    assert train_sft.score_supervised_positions_only()
    compact = train_sft.trl_utils._use_triton
    assert compact(torch.device("cpu")) and compact.scores_cpu_compactly
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(3)])
    assert 0 < int((batch["labels"] != -100).sum()) < batch["labels"].numel()  # prompts and padding are unlabelled
    model = trainer.model.train()
    trainable = [param for param in model.parameters() if param.requires_grad]

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)  # the same LoRA dropout masks in both paths
        # SFTTrainer.compute_loss's forward (without its metrics, which need the run's accelerator state).
        loss = model(**{key: value.clone() for key, value in batch.items()}, fused_lm_head=True, use_cache=False).loss
        loss.backward()
        return loss.detach(), [param.grad.clone() for param in trainable]

    compact_loss, compact_grads = loss_and_grads()
    train_sft.trl_utils._use_triton = lambda device: False  # TRL's CPU behaviour: project every position
    try:
        full_loss, full_grads = loss_and_grads()
    finally:
        train_sft.trl_utils._use_triton = compact
    model.zero_grad()
    assert torch.isfinite(full_loss) and full_loss > 0
    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in full_grads)
    for compact_grad, full_grad in zip(compact_grads, full_grads, strict=True):
        torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_saved_adapter_holds_trained_lora_tensors(lora_run):
    _, output_dir, _ = lora_run
    tensors = load_file(output_dir / "adapter_model.safetensors")
    lora_a = [name for name in tensors if "lora_A" in name]
    lora_b = [name for name in tensors if "lora_B" in name]
    assert lora_a and len(lora_a) == len(lora_b) == 2 * 2  # q_proj and v_proj in 2 layers
    assert all(tensors[name].abs().sum() > 0 for name in lora_b)  # lora_B starts at zero: it was trained
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_reloaded_adapter_and_merged_model_reproduce_logits(lora_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, output_dir, _ = lora_run
    input_ids = tiny_prompt_ids(AutoTokenizer.from_pretrained(output_dir))
    with torch.no_grad():
        # Without the bf16 autocast the accelerator wraps around the trained model's forward, as the reloads run.
        trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        trained = trained.eval()(input_ids=input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        base_logits = base(input_ids=input_ids).logits
        reloaded = PeftModel.from_pretrained(base, output_dir).eval()(input_ids=input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()(input_ids=input_ids).logits
    assert not torch.allclose(base_logits, trained, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, reloaded, atol=1e-4, rtol=1e-4)


def test_push_is_private_carries_model_card_and_retries(lora_run):
    _, output_dir, fake_api = lora_run
    assert fake_api.created[0] == {"repo_id": "me/med-alpaca-tiny", "private": True}
    assert len(fake_api.created) == 2  # the first upload failed and was retried
    assert "model.safetensors" in fake_api.uploads[0]["files"]  # the merged model was pushed
    assert "README.md" in fake_api.uploads[0]["files"]
    assert fake_api.uploads[0]["ignore_patterns"] == list(PUSH_EXCLUDE)
    card = (output_dir / "merged" / "README.md").read_text()
    # The card states what ran: 10 optimizer steps of a --max_steps 10 run, not the default "3.0 epochs".
    assert DISCLAIMER in card and "10 optimizer steps (" in card and "3.0 epochs" not in card
    assert "base_model:" not in card  # the base is a local folder, not a Hub id


def test_failed_push_keeps_local_output_and_says_what_to_do(tmp_path, monkeypatch):
    from hub_cli import retry_command_from, run_hf_cli

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    fake_api = FakeHfApi(failures=5)
    with pytest.raises(HubPushError) as error:
        push_to_hub(folder, "me/x", attempts=3, retry_wait=0, api=fake_api)
    assert len(fake_api.created) == 3 and not fake_api.uploads
    assert error.value.exit_code == 5 and str(folder) in str(error.value)
    assert (folder / "adapter_model.safetensors").read_bytes() == b"weights"
    retry = retry_command_from(str(error.value))
    assert retry == error.value.retry_command
    uploaded = run_hf_cli(retry, monkeypatch)
    assert uploaded["private"] is True and uploaded["uploaded"] == ["adapter_model.safetensors"]


def test_offline_push_fails_at_once_with_exit_5_and_keeps_the_run(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    """The real HfApi with HF_HUB_OFFLINE=1: not retried (it cannot succeed), the adapter and card stay, exit 5."""
    from hub_cli import retry_command_from, run_hf_cli

    output_dir = tmp_path / "run"
    args = parse(tiny_llama_dir, train_file, output_dir, "--max_steps", "1", "--save_steps", "1", "--bf16", "false")
    args[0].push_retry_wait, args[1].push_to_hub, args[1].hub_model_id = 30.0, True, "me/med-alpaca"
    with pytest.raises(HubPushError, match="OfflineModeIsEnabled") as error:
        main(*args)
    assert error.value.exit_code == 5
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "README.md").is_file()
    uploaded = run_hf_cli(retry_command_from(str(error.value)), monkeypatch)
    assert uploaded["private"] is True and "adapter_model.safetensors" in uploaded["uploaded"]
    assert not [p for p in uploaded["uploaded"] if p.startswith("checkpoint-") or p.endswith((".pt", ".pth", ".bin"))]


def test_all_masked_batch_is_refused(lora_run):
    trainer, _, _ = lora_run
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "labels": torch.full((1, 4), -100)}
    with pytest.raises(TrainingRunError, match="every label masked"):
        trainer.training_step(trainer.model.train(), inputs)


def test_validation_counts_planted_bad_records(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    good = load_instruction_records(str(SAMPLE_PATH))[:200]
    planted = [
        {"instruction": "Name the imaging plane.", "input": "", "output": ""},
        {"instruction": "Name the imaging plane.", "input": "", "output": "   \n"},
        {"instruction": "Name the organ.", "input": "", "output": 42},
        {"instruction": ["a", "list"], "input": "", "output": "Liver"},
        {"instruction": "No output field", "input": ""},
        "not a record",
        dict(good[0]),
        dict(good[1]),
        {"instruction": "Summarise. " + "finding " * 1000, "input": "", "output": "Normal."},
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    kept, report = validate_instruction_records(good + planted, tokenizer, 512, max_dropped_share=0.1)
    assert report.dropped == {
        "empty_output": 2,
        "non_string_field": 2,
        "missing_field": 1,
        "not_a_record": 1,
        "duplicate": 2,
        "completion_cut_by_max_length": 1,
    }
    assert len(kept) == report.kept == 200
    assert "209 records, 200 kept, 9 dropped" in report.summary()

    # Above the allowed share, main() stops before loading the model, with the counts and what to do.
    data_file = write_jsonl(good[:20] + planted, tmp_path / "bad.jsonl")
    with pytest.raises(TrainingDataError) as error:
        main(*parse(tiny_llama_dir, data_file, tmp_path / "out", "--max_steps", "1", "--max_length", "512"))
    message = str(error.value)
    assert "9 of 29 records" in message and "--max_dropped_share" in message
    assert "finding finding" not in message and "Name the organ" not in message  # no payload echoed
    # Each problem names its field and the lines it is on (planted records are lines 21-29), with fitting advice.
    assert "empty_output (field 'output'): 2 at line 21, line 22 -> write the answer" in message
    assert "non_string_field (field 'output'): 1 at line 23" in message
    assert "non_string_field (field 'instruction'): 1 at line 24 -> the field must be a string" in message
    assert "missing_field (field 'output'): 1 at line 25 -> add the field" in message
    assert "not_a_record: 1 at line 26" in message
    assert "duplicate: 2 at line 27 (repeats line 1), line 28 (repeats line 2)" in message
    assert "completion_cut_by_max_length: 1 at line 29 (" in message and "raise --max_length" in message


def test_bad_data_gets_the_same_located_report_and_exit_code_from_validate_and_training(tiny_llama_dir, tmp_path):
    """`med_alpaca_data.py validate` and `train_sft.py` on the same bad file: exit 2 both, lines and fields named."""
    good = load_instruction_records(str(SAMPLE_PATH))[:4]
    lines = [json.dumps(record) for record in good] + ["{not json", json.dumps({"instruction": "x", "output": " "})]
    data_file = tmp_path / "bad.jsonl"
    data_file.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line 3
    validate = [sys.executable, str(REPO_ROOT / "med_alpaca_data.py"), "validate", str(data_file)]
    train = [sys.executable, str(REPO_ROOT / "train_sft.py"), "--model_name_or_path", str(tiny_llama_dir)]
    train += ["--dataset_name", str(data_file), "--output_dir", str(tmp_path / "out"), "--bf16", "false"]
    results = [subprocess.run(c, env=_env(), capture_output=True, text=True, timeout=300) for c in (validate, train)]
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert "invalid_json: 1 at line 6 -> each line must be one JSON object" in result.stderr
        assert "empty_output (field 'output'): 1 at line 7" in result.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # A JSON list gets the line each record starts on; a broken list says where it breaks.
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([*good, {"instruction": "x"}], indent=2))
    records, locations = read_instruction_records(str(listed))
    with pytest.raises(TrainingDataError, match=r"missing_field \(field 'output'\): 1 at line 22 ->"):
        validate_instruction_records(records, max_dropped_share=0.1, locations=locations)
    listed.write_text(listed.read_text().replace('"x"', '"x",,'))
    with pytest.raises(TrainingDataError, match="line 23: Expecting"):
        read_instruction_records(str(listed))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--merge", "--use_peft", "false"], "--merge merges a LoRA adapter"),
        (["--push_to_hub"], "--hub_model_id"),
        (["--resume_from_checkpoint", "last"], "no checkpoint in"),
    ],
)
def test_conflicting_flags_fail_before_training(tiny_llama_dir, train_file, tmp_path, flags, expected):
    from modeling_visual_med_alpaca import InputError

    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=expected):
        main(*parse(tiny_llama_dir, train_file, tmp_path / "out", *flags))


def test_an_output_dir_of_another_run_or_checkpoint_is_refused_before_loading(lora_run, tiny_llama_dir, train_file):
    from training_runs import OutputDirError, ResumeMismatchError

    _, output_dir, _ = lora_run
    before = sorted(str(p) for p in output_dir.rglob("*"))
    with pytest.raises(OutputDirError, match=r"different run .*max_steps \(10 there, 2 here\)"):
        main(*parse(tiny_llama_dir, train_file, output_dir, "--max_steps", "2", "--packing", "true"))
    resume = ["--packing", "true", "--resume_from_checkpoint", "last", "--learning_rate", "5e-3", "--max_steps", "10"]
    with pytest.raises(ResumeMismatchError, match=r"checkpoint-10 belongs to a run with other settings: learning_rate"):
        main(*parse(tiny_llama_dir, train_file, output_dir, *resume))
    assert sorted(str(p) for p in output_dir.rglob("*")) == before


def test_recipes_hold_the_original_hyperparameters():
    lora = make_parser().parse_args_and_config(["--config", "recipes/med_alpaca_7b_lora.yaml", "--bf16", "false"])
    script_args, training_args, model_args = lora
    assert (model_args.use_peft, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (
        True,
        8,
        16,
        0.05,
    )
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert (training_args.learning_rate, training_args.num_train_epochs, training_args.max_length) == (1e-4, 3, 512)
    assert script_args.effective_batch_size == 128
    full = make_parser().parse_args_and_config(["--config", "recipes/med_alpaca_7b_full.yaml", "--bf16", "false"])
    assert (full[2].use_peft, full[1].learning_rate, full[1].weight_decay) == (False, 2e-5, 0.0)


@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantized_base_trains(tiny_llama_dir, train_file, tmp_path, bits):
    trainer = main(*parse(tiny_llama_dir, train_file, tmp_path / "run", f"--load_in_{bits}bit", "--max_steps", "3"))
    assert getattr(trainer.model.base_model.model, f"is_loaded_in_{bits}bit")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    tensors = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any(tensors[name].abs().sum() > 0 for name in tensors if "lora_B" in name)


def test_nan_loss_stops_within_a_step_and_keeps_last_good_checkpoint(tiny_llama_dir, train_file, tmp_path):
    from transformers import TrainerCallback

    class PoisonAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    output_dir = tmp_path / "run"
    with pytest.raises(TrainingRunError, match="loss became nan at step 3") as error:
        main(*parse(tiny_llama_dir, train_file, output_dir, "--max_steps", "6"), callbacks=[PoisonAfterCheckpoint()])
    assert "checkpoint-2" in str(error.value)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = load_file(output_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_sigkilled_run_resumes_to_the_same_final_state(tiny_llama_dir, train_file, tmp_path):
    # float32: the killed run is another process with its own float summation order, and bf16 autocast (8-bit
    # mantissa) turns that into differences of a few percent after 3 Adam steps at lr 1e-2, the size of the gap
    # the comparison below must detect. What is restored does not depend on the precision.
    args = ["--max_steps", "5", "--bf16", "false"]
    # Uninterrupted reference.
    reference = main(*parse(tiny_llama_dir, train_file, tmp_path / "reference", *args))
    # A real process that SIGKILLs itself in step 3, after checkpoint-2 was written.
    killed_dir = tmp_path / "killed"
    argv = [str(tiny_llama_dir), str(train_file), str(killed_dir), *args]
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from transformers import TrainerCallback
        from test_train_sft import parse
        from train_sft import main

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

        main(*parse(*{argv!r}), callbacks=[Kill()])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-2"]

    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        trained = []

        def on_step_end(self, args, state, control, **kwargs):
            self.trained.append(state.global_step)

    resumed = main(
        *parse(tiny_llama_dir, train_file, killed_dir, *args, "--resume_from_checkpoint", "last"),
        callbacks=[CountSteps()],
    )
    assert CountSteps.trained == [3, 4, 5]  # continued after checkpoint-2 instead of starting over
    assert resumed.state.global_step == reference.state.global_step == 5
    resumed_steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert resumed_steps == [1, 2, 3, 4, 5]  # steps 1-2 restored from the checkpoint's state, 3-5 trained again
    # TRL's token counter continued from checkpoint-2 instead of restarting at 0.
    tokens = [[e["num_tokens"] for e in run.state.log_history if "num_tokens" in e] for run in (reference, resumed)]
    assert tokens[0] == tokens[1] and tokens[1][-1] > tokens[1][1] > 0
    final = load_file(killed_dir / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    # Optimizer moments, schedule and data order were restored. The killed run is another process (other
    # thread count, other float summation order), so compare in relative norm: a wrong restore (fresh Adam
    # moments, another data order) moves steps 3-5, i.e. most of each tensor, far beyond 1%.
    for name, tensor in expected.items():
        relative = (final[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)
        assert relative < 1e-2, (name, float(relative))


def test_two_process_cpu_run(tiny_llama_dir, train_file, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    output_dir = tmp_path / "ddp"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(REPO_ROOT / "train_sft.py"),
        "--model_name_or_path", str(tiny_llama_dir), "--dataset_name", str(train_file),
        "--output_dir", str(output_dir), "--max_length", str(MAX_LENGTH), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--effective_batch_size", "8", "--gradient_checkpointing", "false",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 per device x 2 accumulation x 2 processes" in result.stdout
    assert (output_dir / "adapter_model.safetensors").stat().st_size > 0
