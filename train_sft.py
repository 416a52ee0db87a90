"""Fine-tune Med-Alpaca: a causal LM on {instruction, input, output} records with TRL's SFTTrainer.

LoRA by default with the original Med-Alpaca-7B-LoRA settings (r=8, alpha=16, dropout 0.05 on q_proj/v_proj,
lr 1e-4, effective batch 128, 3 epochs, max length 512); the loss covers the answer only unless
``--train_on_inputs``. Speed defaults: bf16 mixed precision (GPUs, and CPUs with AVX512-BF16/AMX); records packed
into rows with flash attention, else one per row in length-grouped micro-batches; the LM head projects only the
positions that carry a label. Records are validated first (bad ones are dropped and counted, the run stops when
too many are bad). Every flag of ``SFTConfig`` and TRL's ``ModelConfig`` works, and ``--config recipe.yaml`` loads them.

# LoRA, single process (the shipped sample; replace the model with your LLaMA checkpoint)
```bash
python train_sft.py --model_name_or_path huggyllama/llama-7b --dataset_name data/med_alpaca_sample.jsonl \\
    --output_dir out/med-alpaca-lora --merge
```

# The original runs, from recipes
```bash
accelerate launch --config_file accelerate_configs/single_gpu.yaml train_sft.py \\
    --config recipes/med_alpaca_7b_lora.yaml
accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 4 train_sft.py \\
    --config recipes/med_alpaca_7b_full.yaml
```

# QLoRA (4-bit) or 8-bit base, multi-GPU DDP / DeepSpeed ZeRO-3
```bash
python train_sft.py --config recipes/med_alpaca_7b_lora.yaml --load_in_4bit --output_dir out/med-alpaca-qlora
accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_sft.py --config recipes/med_alpaca_7b_lora.yaml
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_sft.py \\
    --config recipes/med_alpaca_7b_full.yaml
```

# Two CPU processes (plain `--cpu` silently runs ONE process)
```bash
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_sft.py \\
    --model_name_or_path MODEL_DIR --dataset_name data/med_alpaca_sample.jsonl --output_dir out/ddp-cpu
```

# Resume after a crash or kill, push to the Hub (private by default, with a model card)
```bash
python train_sft.py --config recipes/med_alpaca_7b_lora.yaml --resume_from_checkpoint last
python train_sft.py --config recipes/med_alpaca_7b_lora.yaml --merge --push_to_hub --hub_model_id org/med-alpaca
```
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config
from trl.trainer import utils as trl_utils
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hub_push import HubPushError, push_folder
from med_alpaca_data import (
    read_instruction_records,
    to_prompt_completion,
    validate_instruction_records,
)
from modeling_visual_med_alpaca import DISCLAIMER, InputError, VisualMedAlpacaError
from training_runs import (
    RunRecordCallback,
    describe_resume,
    file_digest,
    make_run_record,
    prepare_run,
    restored_counters,
    training_settings,
)

MERGED_SUBDIR = "merged"


class TrainingConfigError(InputError):
    """Flags that cannot work together, or a required flag that is missing."""


class TrainingRunError(VisualMedAlpacaError):
    """Training stopped because continuing would waste the run (non-finite loss, a batch with nothing to learn)."""

    exit_code = 4


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), so bf16 autocast speeds training up."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# --------------------------------------------------------------------------------------------------
# Arguments: TRL's dataclasses with the original Med-Alpaca defaults, plus the script's own.
# --------------------------------------------------------------------------------------------------


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default="data/med_alpaca_sample.jsonl",
        metadata={"help": "JSON list / JSON Lines file of {instruction, input, output} records, or a dataset id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to use for a folder or Hub dataset."})
    train_on_inputs: bool = field(
        default=False,
        metadata={"help": "Put the loss on prompt tokens too, as the original alpaca-lora run did."},
    )
    max_dropped_share: float = field(
        default=0.05, metadata={"help": "Stop before training when validation drops more than this share of records."}
    )
    effective_batch_size: int = field(
        default=128,
        metadata={
            "help": "Sequences per optimizer step over all processes; sets gradient_accumulation_steps. "
            "0 keeps --gradient_accumulation_steps as given."
        },
    )
    merge: bool = field(
        default=False,
        metadata={"help": "After LoRA training, merge the adapter into the unquantised base and save it."},
    )
    merge_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of the merged model.", "choices": ["bfloat16", "float16", "float32"]},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an --output_dir that holds another run's output (a training output only)."},
    )
    push_attempts: int = field(default=3, metadata={"help": "Attempts for --push_to_hub before giving up."})
    push_retry_wait: float = field(default=10.0, metadata={"help": "Seconds before the first retry; doubles."})


@dataclass
class MedAlpacaSFTConfig(SFTConfig):
    """SFTConfig with the original Med-Alpaca-7B-LoRA hyper-parameters as defaults."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Original LoRA run: 1e-4; full fine-tune: 2e-5."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Original: 3 epochs."})
    max_length: int | None = field(default=512, metadata={"help": "Original: 512 tokens."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Micro-batch per process (memory)."})
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack records into max_length rows (best-fit decreasing, no cross-record attention). Default: "
            "packed when the attention implementation has varlen kernels (flash attention), else one record per "
            "row, padded to the longest of a length-grouped micro-batch (faster without varlen kernels)."
        },
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "Micro-batches of records of similar length, so little padding is computed. 'random' for "
            "plain shuffling.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    pad_to_multiple_of: int | str | None = field(
        default=8, metadata={"help": "Pad micro-batches to a multiple of 8 (tensor cores, fewer kernel shapes)."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoints make killed runs resumable."})
    save_steps: float = field(default=100, metadata={"help": "Optimizer steps between checkpoints."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept on disk."})

    def __post_init__(self):
        # TRL turns bf16 mixed precision on when unset, as on any recent GPU. Without a GPU, bf16 autocast stays on
        # where the CPU computes bf16 natively (AVX512-BF16 / AMX; transformers then needs use_cpu), else float32.
        has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not (torch.cuda.is_available() or has_xpu)):
            self.bf16 = cpu_has_native_bf16()
            self.use_cpu = self.use_cpu or self.bf16
        super().__post_init__()


@dataclass
class MedAlpacaModelConfig(ModelConfig):
    """TRL's ModelConfig with LoRA on by default and the original LoRA settings."""

    use_peft: bool = field(default=True, metadata={"help": "LoRA (default). --use_peft false: full fine-tuning."})
    lora_r: int = field(default=8, metadata={"help": "Original: 8."})
    lora_alpha: int = field(default=16, metadata={"help": "Original: 16."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Original: 0.05."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Original: q_proj v_proj."}
    )


def has_varlen_attention(attn_implementation: str | None) -> bool:
    """Whether attention runs packed records without a dense mask (flash-attention's varlen kernels)."""
    return "flash" in (attn_implementation or "")


def resolve_packing(training_args: MedAlpacaSFTConfig, model_args: MedAlpacaModelConfig) -> bool:
    """Fill in ``--packing`` when not given: pack only where varlen attention kernels make packed rows cheap.

    Packed 512-token rows keep records apart with a block-diagonal mask, which sdpa and eager attention compute
    densely over the whole row (sdpa also loses its fused causal path), while length-grouped micro-batches already
    hold little padding: measured in benchmarks/bench_train_sft.py, unpacked rows are faster there.
    """
    if training_args.packing is None:
        training_args.packing = has_varlen_attention(model_args.attn_implementation)
    return training_args.packing


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, MedAlpacaSFTConfig, MedAlpacaModelConfig))


# --------------------------------------------------------------------------------------------------
# Trainer: SFTTrainer that refuses to take a useless or poisoned step.
# --------------------------------------------------------------------------------------------------


def score_supervised_positions_only() -> bool:
    """Make TRL's fused LM head project only the positions that carry a label, on CPU too.

    SFTTrainer never builds the ``(tokens x vocab)`` logits: ``add_fused_lm_head`` runs the backbone, then projects
    through the LM head in tiles and scores each next token. On Triton devices it projects only the positions whose
    label is not -100; elsewhere it projects every position (prompt and padding included) because a changing number
    of positions would recompile XLA/Neuron graphs. Eager CPU has nothing to recompile, so score only the labelled
    positions there as well: the loss and gradients are the same, and with completion-only loss the vocabulary
    projection skips the prompt. Returns whether the switch is in place (False if TRL no longer has it).
    """
    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        return False
    if not getattr(decide, "scores_cpu_compactly", False):

        def compact_on_cpu_too(device: torch.device) -> bool:
            return device.type == "cpu" or decide(device)

        compact_on_cpu_too.scores_cpu_compactly = True
        trl_utils._use_triton = compact_on_cpu_too
    return True


class MedAlpacaSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        score_supervised_positions_only()
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and not bool((labels != -100).any()):
            raise TrainingRunError(
                f"A micro-batch at step {self.state.global_step + 1} has every label masked, so it would train on "
                "nothing. Validation should have dropped such records: check --max_length and --packing."
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
            raise TrainingRunError(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before "
                f"the optimizer used it, and {kept}. Lower --learning_rate, check the data, or use --bf16 instead "
                "of --fp16, then resume with --resume_from_checkpoint."
            )
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counted = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        position_ids = inputs.get("position_ids")
        if self.model.training and "attention_mask" not in inputs and position_ids is not None:
            # TRL counts the tokens of a padding-free batch as one row; PackedRowsCollator batches hold several.
            self._total_train_tokens = counted + (self._total_train_tokens - counted) * position_ids.size(0)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed rows stay rows, with position_ids restarting at each record and no attention mask.

    TRL's padding-free collator flattens a micro-batch of packed rows into one sequence: ideal for
    flash-attention's varlen kernels, but sdpa/eager then attend over ``(rows x max_length)^2`` positions. Kept
    as rows, transformers builds a block-diagonal causal mask per row from the position_ids (records never see
    each other) and attention costs ``rows x max_length^2``. Padding at the end of a row is a block of its own.
    """

    def torch_call(self, examples: list[dict]) -> dict:
        positions = self.get_position_ids_from_packed_seq_lengths([example["seq_lengths"] for example in examples])
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        position_ids = torch.arange(longest).repeat(len(examples), 1)
        for row, (example, row_positions) in enumerate(zip(examples, positions, strict=True)):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            position_ids[row, :length] = row_positions
            position_ids[row, length:] = torch.arange(longest - length)
        # A record's first token is never predicted from the previous record's last one.
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# --------------------------------------------------------------------------------------------------
# Merge and push
# --------------------------------------------------------------------------------------------------


def merge_adapter(base_model: str, adapter_dir: Path, output_dir: Path, dtype: str, revision: str = "main") -> Path:
    """Merge a LoRA adapter into its base loaded unquantised, and save the merged model with the tokenizer."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype), revision=revision)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return output_dir


def write_model_card(folder: Path, base_model: str, dataset_name: str, training_args, model_args, state) -> Path:
    """The card states what ran: the optimizer steps and epochs actually trained (``state``), not the requested ones."""
    method = (
        f"LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}, "
        f"modules {', '.join(model_args.lora_target_modules or [])})"
        if model_args.use_peft
        else "full fine-tuning"
    )
    effective_batch = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    # Only a Hub id is a base model on the Hub; a local folder's path means nothing there.
    is_hub_id = not Path(base_model).exists() and len(base_model.split("/")) == 2
    base_line = f"base_model: {base_model}\n" if is_hub_id else ""
    library = "peft" if model_args.use_peft and not (folder / "model.safetensors").exists() else "transformers"
    card = f"""---
{base_line}library_name: {library}
tags: [medical, biomedical, alpaca, trl, sft, research-only]
---

# Med-Alpaca

{base_model} fine-tuned on biomedical instructions (`{Path(dataset_name).name}`) with TRL's SFTTrainer:
{method}, learning rate {training_args.learning_rate},
{state.global_step} optimizer steps ({state.epoch or 0:.2f} epochs) of {effective_batch} sequences,
max length {training_args.max_length}.
Prompts use the Alpaca training template of Visual Med-Alpaca.

> **{DISCLAIMER}**
"""
    path = folder / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    attempts: int = 3,
    retry_wait: float = 10.0,
    api: HfApi | None = None,
) -> str:
    """Upload ``folder`` (no checkpoints) to a private-by-default repo, retrying; ``HubPushError`` names the retry."""
    commit = push_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message="Upload Med-Alpaca trained with train_sft.py",
        attempts=attempts,
        retry_wait=retry_wait,
        what="trained model",
        api=api or HfApi(token=token),
    )
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _print_derived_numbers(trainer: SFTTrainer, training_args, report) -> None:
    rows = trainer.train_dataset
    lengths = [len(ids) for ids in rows["input_ids"]]
    world = training_args.world_size
    effective = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    micro_batches = math.ceil(len(rows) / (training_args.per_device_train_batch_size * world))
    steps_per_epoch = max(1, math.ceil(micro_batches / training_args.gradient_accumulation_steps))
    steps = (
        training_args.max_steps
        if training_args.max_steps > 0
        else math.ceil(steps_per_epoch * training_args.num_train_epochs)
    )
    mean_row = sum(lengths) / max(1, len(lengths))
    trainer.accelerator.print(
        f"{report.kept} records -> {len(rows)} training rows ({'packed' if training_args.packing else 'one per row'}, "
        f"{training_args.train_sampling_strategy} sampling, "
        f"mean {mean_row:.0f} tokens)\n"
        f"effective batch {effective} = {training_args.per_device_train_batch_size} per device x "
        f"{training_args.gradient_accumulation_steps} accumulation x {world} processes\n"
        f"optimizer steps {steps} ({steps_per_epoch} per epoch), ~{effective * mean_row:,.0f} tokens per step, "
        f"loss on {'prompt and completion' if not trainer.completion_only_loss else 'completion only'}"
    )


def sft_run_settings(script_args: ScriptArguments, training_args, model_args) -> dict:
    """The settings that decide what a run computes (its fingerprint): model, data, method, schedule, batch, seed."""
    return {
        **training_settings(training_args),
        "model": model_args.model_name_or_path,
        "model_revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "dataset": script_args.dataset_name,
        "dataset_split": script_args.dataset_split,
        "dataset_sha256": file_digest(script_args.dataset_name),
        "max_length": training_args.max_length,
        "packing": training_args.packing,
        "completion_only_loss": training_args.completion_only_loss,
        "use_peft": model_args.use_peft,
        "lora": [model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, model_args.lora_target_modules]
        if model_args.use_peft
        else None,
        "quantization": "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None,
    }


def main(
    script_args: ScriptArguments, training_args: MedAlpacaSFTConfig, model_args: MedAlpacaModelConfig, callbacks=None
):
    """Validate the data, train, save (and merge / push). Returns the trainer."""
    if model_args.model_name_or_path is None:
        raise TrainingConfigError("Pass --model_name_or_path (a local folder or a Hub id of a causal LM).")
    push_requested = training_args.push_to_hub
    if push_requested and not training_args.hub_model_id:
        raise TrainingConfigError("--push_to_hub needs --hub_model_id org/name.")
    if script_args.merge and not model_args.use_peft:
        raise TrainingConfigError("--merge merges a LoRA adapter; a full fine-tune (--use_peft false) has none.")
    # The script pushes itself (private by default, retries, model card); the Trainer must not reach the Hub.
    training_args.push_to_hub = False
    training_args.completion_only_loss = not script_args.train_on_inputs
    resolve_packing(training_args, model_args)
    world = training_args.world_size
    if script_args.effective_batch_size > 0:
        per_step = training_args.per_device_train_batch_size * world
        training_args.gradient_accumulation_steps = max(1, round(script_args.effective_batch_size / per_step))
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
    }

    run_record = make_run_record(sft_run_settings(script_args, training_args, model_args))
    # The main process checks (and with --overwrite_output_dir replaces) the folder before the others look at it.
    with training_args.main_process_first(local=False, desc="checking --output_dir"):
        resume = prepare_run(
            training_args.output_dir,
            run_record,
            training_args.resume_from_checkpoint,
            script_args.overwrite_output_dir,
            is_main=training_args.process_index == 0,
        )

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    records, locations = read_instruction_records(script_args.dataset_name, script_args.dataset_split)
    kept, report = validate_instruction_records(
        records, tokenizer, training_args.max_length, script_args.max_dropped_share, locations
    )
    if training_args.process_index == 0:
        print(report.summary())
    dataset = Dataset.from_list([to_prompt_completion(record) for record in kept])

    trainer = MedAlpacaSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=callbacks,
    )
    # TRL's token counter is not part of the Trainer's state: each checkpoint keeps it beside the fingerprint.
    trainer.add_callback(RunRecordCallback(run_record, lambda: {"num_tokens": trainer._total_train_tokens}))
    attention = str(getattr(trainer.model.config, "_attn_implementation", None))
    if trainer.padding_free and training_args.packing and not has_varlen_attention(attention):
        trainer.data_collator = PackedRowsCollator(pad_token_id=trainer.processing_class.pad_token_id)
    _print_derived_numbers(trainer, training_args, report)
    if resume is not None:
        trainer.accelerator.print(describe_resume(resume))
        trainer._total_train_tokens = int(restored_counters(resume).get("num_tokens", 0))
    trainer.train(resume_from_checkpoint=resume)

    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    trainer.save_state()  # trainer_state.json: the steps and epochs that ran, for the cards (publish_bundle reads it)
    trainer.accelerator.wait_for_everyone()
    final_dir = output_dir
    push_error = None
    if trainer.accelerator.is_main_process:
        trainer.accelerator.print(f"Saved to {output_dir}")
        if script_args.merge:
            final_dir = merge_adapter(
                model_args.model_name_or_path,
                output_dir,
                output_dir / MERGED_SUBDIR,
                script_args.merge_dtype,
                model_args.model_revision,
            )
            print(f"Merged model ({script_args.merge_dtype}) saved to {final_dir}")
        write_model_card(
            final_dir, model_args.model_name_or_path, script_args.dataset_name, training_args, model_args, trainer.state
        )
        if push_requested:
            try:
                url = push_to_hub(
                    final_dir,
                    training_args.hub_model_id,
                    private=training_args.hub_private_repo is not False,
                    token=training_args.hub_token,
                    attempts=script_args.push_attempts,
                    retry_wait=script_args.push_retry_wait,
                )
                print(f"Pushed to {url}")
            except HubPushError as error:  # raised after the barrier, so no other rank waits on this one
                push_error = error
    trainer.accelerator.wait_for_everyone()
    if push_error is not None:
        raise push_error
    return trainer


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    try:
        main(script_args, training_args, model_args)
    except VisualMedAlpacaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    finally:
        # Every rank ends the process group, also after an error, so no rank hangs on exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
