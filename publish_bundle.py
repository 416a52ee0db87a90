"""Bundle the trained parts into one Hugging Face Hub repository folder, verify it loads, push it.

Inputs are the standard outputs of the training scripts:

- a Med-GIT checkpoint folder (``GitForCausalLM`` weights + config + ``GitProcessor`` files; ``train_git.py``),
- a Med-Alpaca language model: a base causal-LM folder or Hub id plus a PEFT LoRA adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``; ``train_sft.py``), or an already merged model,
- optionally a DePlot checkpoint (``Pix2StructForConditionalGeneration`` + ``Pix2StructProcessor``).

The output folder is a complete Hub repository: the LoRA merged on the unquantised base in the chosen
dtype, the composite ``VisualMedAlpacaModel`` as sharded safetensors, ``config.json`` with ``auto_map`` and
``custom_pipelines``, the remote-code files (and what they import relatively), the GIT processor in
``captioner/``, the DePlot processor in ``chart_reader/``, the language model's tokenizer at the root (pad
token + Alpaca chat template, so the merged LM can also be served by OpenAI-compatible servers),
``handler.py`` and a ``requirements.txt`` for Inference Endpoints, and ``README.md`` rendered from
``model_card.md``. Training leftovers (optimizer state, ``trainer_state.json``, ``*.bin`` ...) never enter it.

Build and verify a folder only (no Hub access needed)::

    python publish_bundle.py \\
        --captioner_checkpoint outputs/med-git \\
        --language_model outputs/llama-base --adapter outputs/med-alpaca-lora \\
        --output_dir build/visual-med-alpaca --dtype bfloat16

Then push it (private by default; prints the commit sha to pin with ``revision=``)::

    python publish_bundle.py ... --repo_id org/visual-med-alpaca
    python publish_bundle.py --config recipes/publish.yaml        # the same flags as YAML

With an already merged language model, leave out ``--adapter``; add ``--chart_checkpoint`` for DePlot,
``--eval_results_json`` to put evaluation results in the model card.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hub_push import push_folder
from modeling_visual_med_alpaca import (
    ALPACA_CHAT_TEMPLATE,
    DISCLAIMER,
    EXPERT_RADIOLOGY,
    InputError,
    ModelLoadError,
    VisualMedAlpacaConfig,
    VisualMedAlpacaError,
    VisualMedAlpacaModel,
)

REPO_ROOT = Path(__file__).resolve().parent
MODEL_CARD_TEMPLATE = REPO_ROOT / "model_card.md"
ENDPOINT_HANDLER = REPO_ROOT / "handler.py"
# What the endpoint image needs on top of its own torch, as ranges: the Inference Endpoints toolkit `pip install`s
# the repository's requirements.txt into its container (transformers 4.51.3, torch 2.5.1) before it starts, so a
# range keeps the container's own versions where they fit, and a pin would replace them (transformers 5 would also
# switch PyTorch off below torch 2.6). The lower bounds are the oldest stack tested (requirements-transformers4.txt,
# tests/test_transformers_compat.py), the upper ones the pinned stack (requirements.txt).
ENDPOINT_REQUIREMENTS = {
    "transformers": ">=4.51.3,<=5.24.0",
    "accelerate": ">=1.6.0,<2",
    "bitsandbytes": ">=0.45.0,<1",  # 8-bit loading only (VMA_LOAD_IN_8BIT=1); needs torch>=2.4, the image has 2.5.1
    "safetensors": ">=0.4.3",
    "pillow": ">=10.1",
    "numpy": ">=1.26,<3",
    "pydicom": ">=3.0.1,<4",  # the pydicom.pixels API
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Names a training run leaves behind; none may reach a published folder.
LEFTOVER_PATTERNS = (
    r"optimizer\.pt",
    r"scheduler\.pt",
    r"scaler\.pt",
    r"rng_state.*\.pth",
    r"trainer_state\.json",
    r"training_args\.bin",
    r"checkpoint-\d+",
    r"adapter_(config\.json|model\..*)",
    r"events\.out\.tfevents.*",
    r"runs",
    r".*\.(bin|pt|pth|ckpt)",
)


@dataclass
class PublishArguments:
    captioner_checkpoint: str = field(
        metadata={"help": "Med-GIT folder: GitForCausalLM weights + config + GitProcessor files (train_git.py)."}
    )
    output_dir: str = field(metadata={"help": "Where the Hub repository folder is written."})
    language_model: str | None = field(
        default=None,
        metadata={
            "help": "Med-Alpaca: the unquantised base causal LM (folder or Hub id) the adapter was trained on, or a "
            "merged LM. Default with --adapter: the adapter's base_model_name_or_path."
        },
    )
    adapter: str | None = field(
        default=None, metadata={"help": "PEFT LoRA adapter folder to merge into --language_model (train_sft.py)."}
    )
    chart_checkpoint: str | None = field(
        default=None, metadata={"help": "Optional DePlot folder: Pix2StructForConditionalGeneration + processor."}
    )
    dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Weights dtype of the bundle; the LoRA is merged on an unquantised base in it.",
            "choices": list(DTYPES),
        },
    )
    max_shard_size: str = field(default="2GB", metadata={"help": "safetensors shard size, e.g. 2GB or 500MB."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing bundle folder in --output_dir (never another folder)."}
    )
    keep_chat_template: bool = field(
        default=False,
        metadata={"help": "Keep the tokenizer's own chat template instead of the Alpaca one the model was trained on."},
    )
    verify: bool = field(
        default=True, metadata={"help": "Load the folder with pipeline(...) and answer once before pushing."}
    )
    export_language_model: str | None = field(
        default=None,
        metadata={
            "help": "Also save the merged Med-Alpaca alone (weights + tokenizer with chat template) to this folder, "
            "for OpenAI-compatible servers: transformers serve / vLLM / TGI cannot serve the composite model."
        },
    )
    repo_id: str | None = field(default=None, metadata={"help": "Push to this Hub repository (org/name)."})
    private: bool = field(
        default=True, metadata={"help": "Create the Hub repository private (--no_private to publish)."}
    )
    commit_message: str = field(default="Upload Visual Med-Alpaca bundle", metadata={"help": "Hub commit message."})
    push_attempts: int = field(default=3, metadata={"help": "Attempts to push before giving up."})
    push_retry_wait: float = field(default=10.0, metadata={"help": "Seconds before the first retry; doubles."})
    license: str = field(default="other", metadata={"help": "Model card licence id; the base models' licences apply."})
    license_name: str | None = field(
        default="research-only-inherits-base-model-licences", metadata={"help": "Licence name when --license other."}
    )
    base_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Hub ids of the base models for the card; default: git-base, the LM base, deplot."},
    )
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the training datasets."})
    training_summary_json: str | None = field(
        default=None,
        metadata={"help": "JSON {section: {hyper-parameter: value}} added to the card's training section."},
    )
    eval_results_json: str | None = field(
        default=None,
        metadata={"help": "JSON {'dataset': {'name', 'type', 'split'}, 'metrics': {name: value}} for the model card."},
    )
    card_notice: str | None = field(
        default=None,
        metadata={"help": "A notice shown at the top of the model card, e.g. that the weights are demo weights."},
    )


# --------------------------------------------------------------------------------------------------
# Saving (the one place a bundle folder is written; tiny_bundle.save_bundle calls it too)
# --------------------------------------------------------------------------------------------------


def save_pipeline_bundle(
    output_dir, model, tokenizer, captioner_processor, chart_processor=None, max_shard_size: str | None = None
) -> Path:
    """Write weights, config with ``auto_map``/``custom_pipelines``, remote code, tokenizer and expert processors.

    ``Pipeline.save_pretrained`` writes the custom pipeline into ``config.json`` and copies the remote-code
    files with their relative imports; the pipeline's ``save_pretrained`` adds ``captioner/`` and
    ``chart_reader/``, which a plain ``Pipeline.save_pretrained`` does not save.
    """
    from pipeline_vqa import TASK, VisualMedAlpacaPipeline, register_pipeline

    register_pipeline()
    pipe = VisualMedAlpacaPipeline(
        model=model,
        tokenizer=tokenizer,
        captioner_processor=captioner_processor,
        chart_processor=chart_processor,
        task=TASK,
        device=-1,
    )
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    pipe.save_pretrained(output_dir, **kwargs)
    return Path(output_dir)


# --------------------------------------------------------------------------------------------------
# Loading the trained parts
# --------------------------------------------------------------------------------------------------


def load_captioner(checkpoint: str, dtype: torch.dtype):
    from transformers import GitForCausalLM, GitProcessor

    try:
        return GitForCausalLM.from_pretrained(checkpoint, dtype=dtype), GitProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the Med-GIT checkpoint ({type(error).__name__}): --captioner_checkpoint needs "
            "GitForCausalLM weights, config.json and the GitProcessor files (what train_git.py saves)."
        ) from None


def load_chart_reader(checkpoint: str, dtype: torch.dtype):
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    try:
        model = Pix2StructForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
        return model, Pix2StructProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the DePlot checkpoint ({type(error).__name__}): --chart_checkpoint needs "
            "Pix2StructForConditionalGeneration weights and the Pix2StructProcessor files."
        ) from None


def load_language_model(base: str, adapter: str | None, dtype: torch.dtype):
    """The Med-Alpaca LM, with the LoRA (if any) merged on the unquantised base in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not read the language model's config ({type(error).__name__}).") from None
    if getattr(base_config, "quantization_config", None):
        raise InputError(
            "--language_model is a quantised checkpoint: merge the LoRA on the unquantised base "
            "(the fp16/bf16 weights the adapter was trained on), then the bundle offers 8-bit loading itself."
        )
    language_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter is None:
        return language_model.eval()
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError("--adapter must be a PEFT adapter folder holding adapter_config.json (train_sft.py output).")
    merged = PeftModel.from_pretrained(language_model, adapter).merge_and_unload()
    return merged.eval()


def load_language_tokenizer(base: str, adapter: str | None, keep_chat_template: bool):
    """The adapter's tokenizer when the training run saved one there, else the base's; pad + chat template set."""
    from transformers import AutoTokenizer

    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        # Reuse an existing token: adding one would change the vocabulary the weights were trained with.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not keep_chat_template or not tokenizer.chat_template:
        tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    return tokenizer


def assemble_model(captioner, language_model, chart_reader=None) -> VisualMedAlpacaModel:
    """The composite model around already-trained parts, without allocating a second random copy of them."""
    from accelerate import init_empty_weights

    config = VisualMedAlpacaConfig(
        captioner_config=captioner.config.to_dict(),
        text_config=language_model.config.to_dict(),
        chart_config=chart_reader.config.to_dict() if chart_reader is not None else None,
    )
    with init_empty_weights():
        model = VisualMedAlpacaModel(config)
    model.captioner = captioner
    model.language_model = language_model
    model.chart_reader = chart_reader
    left_on_meta = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if left_on_meta:
        raise ModelLoadError(f"{len(left_on_meta)} composite weights were not filled from the checkpoints.")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Model card, endpoint files, leftovers
# --------------------------------------------------------------------------------------------------


def endpoint_requirements() -> str:
    """The endpoint's requirements.txt: ``ENDPOINT_REQUIREMENTS`` as ranges, never torch (the image's CUDA build)."""
    header = (
        "# Inference Endpoints: installed on top of the endpoint image's torch (do not pin torch here: the\n"
        "# image's CUDA build must stay). Ranges, so the image's own versions are kept where they fit.\n"
        "# Written by publish_bundle.py.\n"
    )
    return header + "\n".join(name + spec for name, spec in ENDPOINT_REQUIREMENTS.items()) + "\n"


def write_endpoint_files(output_dir) -> None:
    """What the Inference Endpoints toolkit looks for in the repository: ``handler.py`` and ``requirements.txt``."""
    output_dir = Path(output_dir)
    shutil.copyfile(ENDPOINT_HANDLER, output_dir / "handler.py")
    (output_dir / "requirements.txt").write_text(endpoint_requirements())


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"Could not read the JSON file {Path(path).name} ({type(error).__name__}).") from None


def _trainer_state(checkpoint: str | None) -> dict:
    """Hyper-parameters from a training run's ``trainer_state.json`` (in the folder, or its latest checkpoint)."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return {}
    folder = Path(checkpoint)
    candidates = [folder / "trainer_state.json"]
    numbered = [p for p in folder.glob("checkpoint-*/trainer_state.json") if p.parent.name[11:].isdigit()]
    candidates += sorted(numbered, key=lambda p: int(p.parent.name[11:]), reverse=True)  # the latest first
    state_file = next((p for p in candidates if p.is_file()), None)
    if state_file is None:
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        print(f"Note: {state_file.name} in {folder.name} is unreadable; the card leaves that run's numbers out.")
        return {}
    # What ran (global_step, epoch), not what was asked for: a --max_steps 6 run also records num_train_epochs 3.
    summary = {key: state[key] for key in ("global_step", "train_batch_size") if key in state}
    if isinstance(state.get("epoch"), (int, float)):
        summary["epochs"] = round(float(state["epoch"]), 2)
    logged = [entry for entry in state.get("log_history", []) if "loss" in entry]
    if logged:
        summary["final_train_loss"] = round(float(logged[-1]["loss"]), 4)
    rates = [entry["learning_rate"] for entry in state.get("log_history", []) if "learning_rate" in entry]
    if rates:
        summary["peak_learning_rate"] = max(rates)
    return summary


def training_details(args: PublishArguments) -> dict[str, dict]:
    """What the card can say about training: the LoRA config, trainer states, and a user-given summary."""
    details: dict[str, dict] = {}
    if args.adapter:
        lora = _read_json(Path(args.adapter) / "adapter_config.json")
        details["Med-Alpaca LoRA (merged)"] = {
            key: (", ".join(sorted(lora[key])) if isinstance(lora[key], list) else lora[key])
            for key in ("r", "lora_alpha", "lora_dropout", "target_modules")
            if lora.get(key) is not None
        }
        base = lora.get("base_model_name_or_path")
        if base:  # a Hub id as is; of a local folder only its name (a full path says nothing on the Hub)
            details["Med-Alpaca LoRA (merged)"]["base model"] = _hub_id(base) or f"local folder `{Path(base).name}`"
    for section, checkpoint in (
        ("Med-Alpaca training run", args.adapter),
        ("Med-GIT training run", args.captioner_checkpoint),
    ):
        state = _trainer_state(checkpoint)
        if state:
            details[section] = state
    if args.training_summary_json:
        for section, values in _read_json(args.training_summary_json).items():
            details.setdefault(section, {}).update(values if isinstance(values, dict) else {"value": values})
    return details


def _numeric_leaves(mapping: dict, prefix: str = "") -> dict[str, float]:
    leaves = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(_numeric_leaves(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            leaves[name] = float(value)
    return leaves


def eval_results(path: str | None, model_name: str) -> tuple[list, list[dict]]:
    """``EvalResult``s for the card metadata and rows for its table, from an evaluation JSON file."""
    if not path:
        return [], []
    from huggingface_hub import EvalResult

    report = _read_json(path)
    dataset = report.get("dataset") if isinstance(report.get("dataset"), dict) else {}
    metrics = report.get("metrics", {k: v for k, v in report.items() if k != "dataset"})
    values = _numeric_leaves(metrics if isinstance(metrics, dict) else {})
    if not values:
        raise InputError("--eval_results_json holds no numeric metrics (expected {'metrics': {name: value}}).")
    dataset_name = dataset.get("name", "VQA-RAD")
    dataset_type = dataset.get("type", "flaviagiammarino/vqa-rad")
    split = dataset.get("split")
    results = [
        EvalResult(
            task_type="visual-question-answering",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=name.replace("/", "_"),
            metric_name=name,
            metric_value=value,
        )
        for name, value in values.items()
    ]
    rows = [{"dataset": dataset_name, "split": split or "", "metric": n, "value": v} for n, v in values.items()]
    return results, rows


def _hub_id(source: str | None) -> str | None:
    """``source`` if it names a Hub repository (``org/name``, not an existing local path), else ``None``."""
    if source and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not Path(source).exists():
        return source
    return None


def run_summary(checkpoint: str | None) -> dict:
    """``run_summary.json`` of a train_git.py output (its base model and data), ``{}`` when there is none."""
    path = Path(checkpoint or "") / "run_summary.json"
    if not checkpoint or not path.is_file():
        return {}
    summary = _read_json(path)
    return summary if isinstance(summary, dict) else {}


def default_base_models(args: PublishArguments) -> list[str]:
    """Hub ids of the base models that are known, never assumed: a checkpoint given as a Hub id, the base named in
    its training record (train_git's run_summary.json, the adapter's config). A captioner trained from a local or
    random base (the demo's) claims no ``microsoft/git-base``; local paths are not base models on the Hub."""
    captioner = _hub_id(args.captioner_checkpoint) or _hub_id(run_summary(args.captioner_checkpoint).get("base_model"))
    lm_base = args.language_model
    if args.adapter:
        lm_base = _read_json(Path(args.adapter) / "adapter_config.json").get("base_model_name_or_path") or lm_base
    candidates = [captioner, _hub_id(lm_base), _hub_id(args.chart_checkpoint)]
    return list(dict.fromkeys(c for c in candidates if c))


def captioner_data(args: PublishArguments) -> str:
    """What the captioner was trained on, as its training run recorded it (for the card's limitations)."""
    data = run_summary(args.captioner_checkpoint).get("data") or {}
    if data.get("format") == "roco":
        return "public figure captions from PubMed Central articles (ROCO)"
    if data.get("source"):
        return f"`{data['source']}` ({data.get('format', 'unknown')} layout)"
    return "data its checkpoint does not record"


def render_model_card(args: PublishArguments, model: VisualMedAlpacaModel, output_dir: Path):
    """``README.md`` from the ``model_card.md`` template with huggingface_hub's ModelCard API."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    model_name = (args.repo_id or output_dir.name).split("/")[-1]
    results, eval_rows = eval_results(args.eval_results_json, model_name)
    card_data = ModelCardData(
        language=["en"],
        license=args.license,
        license_name=args.license_name if args.license == "other" else None,
        base_model=args.base_models or default_base_models(args) or None,
        datasets=args.datasets or None,
        tags=["medical", "biomedical", "radiology", "visual-question-answering", "llama", "git", "lora", "custom_code"],
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        model_name=model_name,
        eval_results=results or None,
    )
    experts = [f"radiology captioner (Med-GIT, `GitForCausalLM`) from `{Path(args.captioner_checkpoint).name}`"]
    if model.chart_reader is not None:
        experts.append(
            f"chart reader (DePlot, `Pix2StructForConditionalGeneration`) from `{Path(args.chart_checkpoint).name}`"
        )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=args.repo_id or "org/visual-med-alpaca",
        disclaimer=DISCLAIMER,
        notice=args.card_notice,
        experts=experts,
        language_model=f"`{type(model.language_model).__name__}`"
        + (" with the LoRA adapter merged" if args.adapter else " (already merged)"),
        dtype=args.dtype,
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M",
        training=training_details(args),
        datasets=args.datasets,
        eval_rows=eval_rows,
        ct_windows=getattr(model.config, "ct_windows", None),
        transformers_version=transformers.__version__,
        has_chart_reader=model.chart_reader is not None,
        captioner_data=captioner_data(args),
    )
    card.save(output_dir / "README.md")
    return card


def find_leftovers(folder: Path) -> list[str]:
    pattern = re.compile("|".join(f"(?:{p})" for p in LEFTOVER_PATTERNS))
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if pattern.fullmatch(path.name))


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        config = output_dir / "config.json"
        is_bundle = config.is_file() and json.loads(config.read_text()).get("model_type") == "visual_med_alpaca"
        if not overwrite:
            raise InputError("--output_dir is not empty: pick a new folder or pass --overwrite_output_dir.")
        if not is_bundle:
            raise InputError("--output_dir holds something other than a bundle; it is not deleted. Pick a new folder.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Verify and push
# --------------------------------------------------------------------------------------------------


def verify_bundle(output_dir: Path, dtype: torch.dtype) -> list[dict]:
    """Load the folder the way a user does and answer one image and one text-only question."""
    import numpy as np
    from transformers import pipeline

    try:
        vqa = pipeline(model=str(output_dir), trust_remote_code=True, dtype=dtype)
        gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
        records = vqa(
            [{"image": gradient, "question": "What is shown?"}, {"question": "What is a stroke?"}], max_new_tokens=8
        )
    except VisualMedAlpacaError:
        raise
    except Exception as error:  # anything else means the folder is not a loadable bundle
        raise ModelLoadError(
            f"The bundle folder does not load with pipeline(..., trust_remote_code=True) ({type(error).__name__}: "
            f"{error}). Nothing was pushed."
        ) from error
    if [r["expert"] for r in records] != [EXPERT_RADIOLOGY, None] or any(
        r["disclaimer"] != DISCLAIMER for r in records
    ):
        raise ModelLoadError("The bundle loaded but its answers lack the expected record fields. Nothing was pushed.")
    return records


def push_bundle(
    output_dir: Path, repo_id: str, private: bool, commit_message: str, api=None, attempts: int = 1, retry_wait=10.0
) -> str:
    """``create_repo`` + ``upload_folder``; returns the commit sha. A failure keeps the folder: ``HubPushError``."""
    commit = push_folder(
        output_dir,
        repo_id,
        private=private,
        commit_message=commit_message,
        attempts=attempts,
        retry_wait=retry_wait,
        what="verified bundle",
        api=api,
    )
    return commit.oid


def main(args: PublishArguments, api=None) -> dict:
    """Build, verify and (with ``repo_id``) push; returns what was done, for tests and scripts."""
    dtype = DTYPES[args.dtype]
    output_dir = Path(args.output_dir)
    if args.repo_id and not args.verify:
        raise InputError("A bundle is pushed only after it was verified: drop --no_verify or --repo_id.")
    if args.language_model is None:
        base = _read_json(Path(args.adapter) / "adapter_config.json") if args.adapter else {}
        if not base.get("base_model_name_or_path"):
            raise InputError("Pass --language_model (the base the adapter was trained on, or a merged model).")
        args.language_model = base["base_model_name_or_path"]
    steps = 5 + bool(args.repo_id)
    print(f"[1/{steps}] Loading Med-GIT from {args.captioner_checkpoint} ...", flush=True)
    captioner, captioner_processor = load_captioner(args.captioner_checkpoint, dtype)
    chart_reader = chart_processor = None
    if args.chart_checkpoint:
        chart_reader, chart_processor = load_chart_reader(args.chart_checkpoint, dtype)
    merge_note = f" + merging the LoRA adapter {args.adapter}" if args.adapter else " (already merged)"
    print(f"[2/{steps}] Loading Med-Alpaca {args.language_model}{merge_note} in {args.dtype} ...", flush=True)
    language_model = load_language_model(args.language_model, args.adapter, dtype)
    tokenizer = load_language_tokenizer(args.language_model, args.adapter, args.keep_chat_template)
    model = assemble_model(captioner, language_model, chart_reader).to(dtype)

    print(f"[3/{steps}] Writing the bundle to {output_dir} (shards of at most {args.max_shard_size}) ...", flush=True)
    prepare_output_dir(output_dir, args.overwrite_output_dir)
    save_pipeline_bundle(output_dir, model, tokenizer, captioner_processor, chart_processor, args.max_shard_size)
    write_endpoint_files(output_dir)
    render_model_card(args, model, output_dir)
    if args.export_language_model:
        language_model.save_pretrained(args.export_language_model, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(args.export_language_model)
        print(f"      The merged language model alone: {args.export_language_model}")
    leftovers = find_leftovers(output_dir)
    if leftovers:
        raise ModelLoadError(f"Training leftovers in the bundle: {', '.join(leftovers)}. Nothing was pushed.")
    del model, captioner, language_model, chart_reader

    records = []
    if args.verify:
        print(f"[4/{steps}] Verifying: pipeline(model={output_dir}, trust_remote_code=True) answers ...", flush=True)
        records = verify_bundle(output_dir, dtype)
    result = {"output_dir": str(output_dir), "verification": records, "commit_sha": None}
    print(f"[5/{steps}] Bundle ready: {output_dir} ({sum(1 for _ in output_dir.rglob('*') if _.is_file())} files)")
    if args.repo_id:
        visibility = "private" if args.private else "public"
        print(f"[6/{steps}] Pushing to {args.repo_id} ({visibility}) ...", flush=True)
        sha = push_bundle(
            output_dir,
            args.repo_id,
            args.private,
            args.commit_message,
            api=api,
            attempts=args.push_attempts,
            retry_wait=args.push_retry_wait,
        )
        result["commit_sha"] = sha
        print(f"Pushed {args.repo_id} at commit {sha}. Pin it:")
        print(f'    pipeline(model="{args.repo_id}", revision="{sha}", trust_remote_code=True)')
    return result


if __name__ == "__main__":
    from trl import TrlParser

    (script_args,) = TrlParser(PublishArguments).parse_args_and_config()
    try:
        main(script_args)
    except VisualMedAlpacaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
