"""Visual Med-Alpaca: a composite model of visual experts and a biomedical language model.

Remote code: this file is copied into the published Hub repository and imported by
``trust_remote_code``. It imports installed packages only (and, relatively, its sibling remote-code
files), so a Hub user needs nothing from this repository's checkout.

It holds the facts every other part of the project imports rather than copies:

- the Alpaca prompt templates (inference with/without an image, training with/without an input),
- the research-use disclaimer,
- the typed error hierarchy that the pipeline, CLI, endpoint and app map to codes,
- ``VisualMedAlpacaConfig`` and ``VisualMedAlpacaModel``.

Example (with a bundle folder or Hub repository id)::

    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("org/visual-med-alpaca", trust_remote_code=True)
    >>> caption_ids = model.caption_images(pixel_values)           # Med-GIT
    >>> answer_ids = model.generate_answer(input_ids, attention_mask)  # Med-Alpaca

Most users want the pipeline instead: ``pipeline(model=..., trust_remote_code=True)``.
"""

from __future__ import annotations

import re

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# --------------------------------------------------------------------------------------------------
# Prompt templates (DESIGN.md §2): byte for byte those of the original Visual Med-Alpaca system.
# --------------------------------------------------------------------------------------------------

PROMPT_TEMPLATES = {
    # Inference, with an image: the visual expert's intermediate text is the input.
    "inference_with_image": (
        "Below is an instruction that describes a task, paired with an input that provides further context "
        "of an uploaded image. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{question}\n\n### Input:\n{image_caption}\n\n### Response:\n"
    ),
    # Inference, no image.
    "inference_no_image": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{question}\n\n### Response:\n"
    ),
    # Training (Alpaca-LoRA style), with a non-empty input; the output follows the prompt.
    "training_with_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    # Training, empty input: the no-input inference form; the output follows the prompt.
    "training_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    # Follow-up questions (multi-turn; this project's extension, not part of the original system). The
    # current question stays the instruction; the image's intermediate text and the earlier turns, oldest
    # first, are the input. With an empty history the inference templates above are used unchanged.
    "follow_up_with_image": (
        "Below is an instruction that describes a task, paired with an input that provides further context "
        "of an uploaded image. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{question}\n\n### Input:\n{image_caption}\n\n{conversation}\n\n### Response:\n"
    ),
    "follow_up_no_image": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{question}\n\n### Input:\n{conversation}\n\n### Response:\n"
    ),
    # The earlier conversation inside a follow-up's input: a header, then one block per turn.
    "conversation_header": "Earlier conversation about this case:",
    "conversation_turn": "Question: {question}\nAnswer: {answer}",
}


def _alpaca_chat_template() -> str:
    """A chat template whose plain user turn renders exactly the no-image inference prompt.

    Saved with the language model's tokenizer so the merged Med-Alpaca can also be served on its own by
    OpenAI-compatible servers (``transformers serve``, vLLM, TGI) and still see the Alpaca prompt. A user turn
    that already is a complete Alpaca prompt (what the pipeline's chat backend sends) is used verbatim. BOS
    comes first because chat tokenisation adds no special tokens: the served model then sees exactly the
    tokens the local pipeline feeds it.
    """
    before, after = PROMPT_TEMPLATES["inference_no_image"].split("{question}")
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if message['content'].startswith('Below is an instruction that describes a task') %}"
        "{{ message['content'] }}"
        "{% else %}"
        f"{before}{{{{ message['content'] }}}}{after}"
        "{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}"
    )


ALPACA_CHAT_TEMPLATE = _alpaca_chat_template()

DISCLAIMER = (
    "Research use only. Visual Med-Alpaca is not a medical device and has not been clinically validated: "
    "its answers are generated by machine-learning models, can be wrong or incomplete, and must not be "
    "used for diagnosis, treatment or any clinical decision. Consult a qualified clinician."
)

# A section marker typed by a user or emitted by an expert ("### Response:") would let that text
# restructure the prompt. The hashes are removed; the words stay so the meaning is kept.
_TEMPLATE_MARKER = re.compile(r"#{2,}[ \t]*(?=(?:instruction|input|response)\b)", re.IGNORECASE)


def neutralize_template_markers(text: str) -> tuple[str, bool]:
    """Return ``text`` with Alpaca section markers defused, and whether anything was changed."""
    cleaned = _TEMPLATE_MARKER.sub("", text)
    return cleaned, cleaned != text


def build_inference_prompt(question: str, intermediate_text: str | None = None) -> str:
    """The inference prompt: with the expert's text as input when an image was read, else the no-image form.

    Both arguments must already be neutralised (see ``neutralize_template_markers``); the pipeline does it.
    """
    if intermediate_text is None:
        return PROMPT_TEMPLATES["inference_no_image"].format(question=question)
    return PROMPT_TEMPLATES["inference_with_image"].format(question=question, image_caption=intermediate_text)


def build_follow_up_prompt(
    question: str, intermediate_text: str | None = None, history: list[dict] | tuple = ()
) -> str:
    """The prompt of a question asked after earlier turns about the same case (image or no image).

    ``history`` holds the earlier turns, oldest first, as ``{"question": ..., "answer": ...}`` dicts.
    With no history this is exactly ``build_inference_prompt``; all texts must already be neutralised.
    """
    if not history:
        return build_inference_prompt(question, intermediate_text)
    turns = [PROMPT_TEMPLATES["conversation_turn"].format(question=t["question"], answer=t["answer"]) for t in history]
    conversation = "\n\n".join([PROMPT_TEMPLATES["conversation_header"], *turns])
    if intermediate_text is None:
        return PROMPT_TEMPLATES["follow_up_no_image"].format(question=question, conversation=conversation)
    return PROMPT_TEMPLATES["follow_up_with_image"].format(
        question=question, image_caption=intermediate_text, conversation=conversation
    )


def build_training_prompt(instruction: str, input_text: str = "") -> str:
    """The training prompt of one ``{instruction, input, output}`` record; the output is the completion."""
    if input_text.strip():
        return PROMPT_TEMPLATES["training_with_input"].format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATES["training_no_input"].format(instruction=instruction)


# --------------------------------------------------------------------------------------------------
# Errors: one typed hierarchy. Messages say what was wrong and what to do; they never contain
# payload bytes, image metadata or DICOM header values.
# --------------------------------------------------------------------------------------------------


class VisualMedAlpacaError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with, ``http_status`` what the endpoint returns."""

    exit_code = 1
    http_status = 500


class InputError(VisualMedAlpacaError, ValueError):
    """The request itself is wrong (the caller can fix it)."""

    exit_code = 2
    http_status = 400


class MissingQuestionError(InputError):
    """No question, or an empty one."""


class UnknownParameterError(InputError):
    """A keyword the pipeline does not know, or two keywords that conflict."""


class ImageInputError(InputError):
    """The image could not be used."""


class InvalidImageError(ImageInputError):
    """Unreadable, truncated or corrupt image data, or a missing file."""

    http_status = 422


class UnsupportedImageFormatError(ImageInputError):
    """The content is not one of the accepted formats."""

    http_status = 415


class ImageTooLargeError(ImageInputError):
    """The image exceeds a byte or pixel cap."""

    http_status = 413


class DicomDecoderMissingError(UnsupportedImageFormatError):
    """DICOM pixel data in a compressed transfer syntax whose decoder package is not installed."""


class ImageURLNotAllowedError(ImageInputError):
    """An image URL was given where fetching is off (servers never fetch arbitrary addresses)."""

    http_status = 403


class PayloadTooLargeError(InputError):
    """The request as a whole is too large (too many inputs, or a field over its size cap)."""

    http_status = 413


class ExpertUnavailableError(InputError):
    """The requested visual expert is not part of this bundle."""


class ModelLoadError(VisualMedAlpacaError):
    """The bundle could not be loaded (missing files, wrong revision, incompatible weights)."""

    exit_code = 3
    http_status = 503


class BackendError(VisualMedAlpacaError):
    """The remote language-model server refused the request or answered with something unusable.

    Messages name the server (scheme, host, port) and the HTTP status, never the prompt, the
    server's response body or the API key.
    """

    exit_code = 4
    http_status = 502


class BackendUnavailableError(BackendError):
    """The remote language-model server could not be reached, or still failed (429/5xx) after the retries."""

    http_status = 503


class BackendTimeoutError(BackendUnavailableError):
    """The remote language-model server did not answer within the timeout (after the retries)."""

    http_status = 504


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

EXPERT_RADIOLOGY = "radiology"
EXPERT_CHART = "chart"
EXPERTS = (EXPERT_RADIOLOGY, EXPERT_CHART)

# The built-in visual experts, as config entries. An entry says everything the model and the pipeline
# need to know about an expert, so adding one (e.g. a dermatology captioner) is an entry in
# ``config.experts`` (plus a small class in ``visual_experts.py`` only for a new *kind* of expert):
#   kind                the run-time class in visual_experts.py ("captioner", "chart_table", ...)
#   module              the model attribute holding its weights (also their prefix in the checkpoint)
#   model_class         the transformers class built from the sub-config
#   model_config        the name of a sub-config attribute of this config, or an inline config dict
#                       (with "model_type") for experts added by users
#   processor_class     the transformers processor class, loaded from the bundle's processor_subfolder
#   processor_subfolder where the expert's processor is saved in the bundle
#   prompt              the expert's text prompt (DePlot's header), or None
#   router_label        what the zero-shot router matches images against for this expert
# Optional: max_new_tokens (default: caption_max_new_tokens / chart_max_new_tokens), max_patches.
DEFAULT_EXPERT_SPECS = {
    EXPERT_RADIOLOGY: {
        "kind": "captioner",
        "module": "captioner",
        "model_class": "GitForCausalLM",
        "model_config": "captioner_config",
        "processor_class": "GitProcessor",
        "processor_subfolder": "captioner",
        "prompt": None,
        "router_label": "a radiology image: an X-ray, CT or MRI scan",
    },
    EXPERT_CHART: {
        "kind": "chart_table",
        "module": "chart_reader",
        "model_class": "Pix2StructForConditionalGeneration",
        "model_config": "chart_config",
        "processor_class": "Pix2StructProcessor",
        "processor_subfolder": "chart_reader",
        "prompt": "Generate underlying data table of the figure below:",
        "router_label": "a chart or plot of data from a scientific paper",
    },
}
EXPERT_SPEC_KEYS = frozenset(
    {"kind", "module", "model_class", "model_config", "processor_class", "processor_subfolder", "prompt"}
)


class _PresentSubConfigs:
    """``sub_configs`` of the composite config: the parts it holds (on the class: every possible part).

    An absent optional part (no chart reader) is left out, because transformers 4.x's ``to_diff_dict`` recurses into
    every listed name and fails on ``None``.
    """

    NAMES = ("captioner_config", "text_config", "chart_config")

    def __get__(self, instance, owner) -> dict:
        present = [name for name in self.NAMES if instance is None or getattr(instance, name, None) is not None]
        return dict.fromkeys(present, AutoConfig)


def _sub_config(value: dict | PretrainedConfig | None, default_model_type: str) -> PretrainedConfig:
    """A part's config from a config, a dict (``model_type`` defaulting to ``default_model_type``) or nothing."""
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value or {})
    return AutoConfig.for_model(value.pop("model_type", default_model_type), **value)


def _merged_expert_specs(experts: dict | None) -> dict:
    """``DEFAULT_EXPERT_SPECS`` with the config's entries merged over them; an incomplete new entry is refused."""
    merged_specs = {name: dict(spec) for name, spec in DEFAULT_EXPERT_SPECS.items()}
    for name, spec in (experts or {}).items():
        merged = {**merged_specs.get(name, {}), **spec}
        missing = sorted(EXPERT_SPEC_KEYS - set(merged))
        if missing:
            raise ModelLoadError(
                f"Expert '{name}' in config.experts lacks {', '.join(missing)}; see DEFAULT_EXPERT_SPECS."
            )
        merged_specs[name] = merged
    return merged_specs


class VisualMedAlpacaConfig(PretrainedConfig):
    r"""Configuration of [`VisualMedAlpacaModel`].

    Args:
        captioner_config (`dict` or `GitConfig`): the radiology captioner, Med-GIT (base `microsoft/git-base`).
        text_config (`dict` or `PretrainedConfig`): the language model, Med-Alpaca (a LLaMA-architecture
            causal LM; any `AutoModelForCausalLM` config works).
        chart_config (`dict` or `Pix2StructConfig`, *optional*): the chart reader, DePlot. Bundles without
            one answer chart questions through the captioner, with a warning.
        experts (`dict`, *optional*): the visual experts, name -> entry (see ``DEFAULT_EXPERT_SPECS``);
            defaults to the radiology captioner and the chart reader. Entries given here are merged
            over the defaults, so a bundle adds an expert by adding one entry.
        router_mode (`str`): ``"statistics"`` (default: image statistics, no extra model) or ``"zero-shot"``.
        router_model (`str`, *optional*): a zero-shot image classification model (Hub id or folder),
            used when ``router_mode="zero-shot"``.
        caption_max_new_tokens (`int`): caption length limit of the radiology expert.
        chart_max_new_tokens (`int`): table length limit of the chart expert.
        chart_max_patches (`int`): Pix2Struct patches per chart (passed explicitly; the processor's
            silent default is 2048).
        answer_max_new_tokens (`int`): default answer length.
        max_prompt_tokens (`int`): prompts longer than this are refused with a clear error.
        intermediate_cache_size (`int`): how many experts' texts the pipeline keeps, keyed by image content,
            expert and weights revision, so several questions about one image run its expert once (LRU;
            `0` disables it). The pipeline's `intermediate_cache_size=` argument overrides it.
        series_mode (`str`): how a DICOM series or volume reaches the 2-D experts: `"key_slices"` (default: the
            expert reads `series_slices` evenly spaced slices, one by one), `"middle"` (the middle slice) or
            `"montage"` (the key slices tiled into one image, read once). See `medical_series.py`.
        series_slices (`int`): how many key slices `"key_slices"` and `"montage"` read (default 5).
        language_backend (`str` or `dict`, *optional*): who answers the prompt by default: `"local"` (or
            `None`, the bundle's own language model) or an OpenAI-compatible server, e.g.
            `{"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "med-alpaca",
            "api_key_env": "OPENAI_API_KEY"}` (see `language_backends.py`). Only the *name* of the
            environment variable that holds the key is stored, never the key.
        ct_windows (`list`, *optional*): the default CT windows for DICOM CT: `None` (one window, what Med-GIT was
            trained on) or three windows packed into R, G and B, each a preset name (`"brain"`, `"lung"`, ...,
            see `medical_image.CT_WINDOW_PRESETS`) or `[center, width]` in HU. The pipeline's `ct_windows=`
            keyword overrides it per call.
    """

    model_type = "visual_med_alpaca"
    # A classic __init__ rather than transformers 5's dataclass fields + SubConfigSpec, so one class loads on every
    # transformers from 4.51 to 5.x: v5 keeps a config's own __init__ (PreTrainedConfig.__init_subclass__ wraps only
    # classes without one) and both read ``sub_configs`` (name -> class) to recurse into the parts.
    sub_configs = _PresentSubConfigs()

    def __init__(
        self,
        captioner_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        chart_config: dict | PretrainedConfig | None = None,
        experts: dict | None = None,
        router_mode: str = "statistics",
        router_model: str | None = None,
        caption_max_new_tokens: int = 48,
        chart_max_new_tokens: int = 256,
        chart_max_patches: int = 1024,
        answer_max_new_tokens: int = 128,
        max_prompt_tokens: int = 1536,
        intermediate_cache_size: int = 256,
        series_mode: str = "key_slices",
        series_slices: int = 5,
        language_backend: dict | str | None = None,
        ct_windows: list | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.captioner_config = _sub_config(captioner_config, "git")
        self.text_config = _sub_config(text_config, "llama")
        self.chart_config = None if chart_config is None else _sub_config(chart_config, "pix2struct")
        self.experts = _merged_expert_specs(experts)
        self.router_mode = router_mode
        self.router_model = router_model
        self.caption_max_new_tokens = caption_max_new_tokens
        self.chart_max_new_tokens = chart_max_new_tokens
        self.chart_max_patches = chart_max_patches
        self.answer_max_new_tokens = answer_max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.intermediate_cache_size = intermediate_cache_size
        self.series_mode = series_mode
        self.series_slices = series_slices
        self.language_backend = language_backend
        self.ct_windows = ct_windows
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def expert_model_config(self, name: str) -> PretrainedConfig | None:
        """The sub-config of expert ``name``; ``None`` when the bundle does not include that expert."""
        reference = self.experts[name]["model_config"]
        if reference is None:
            return None
        if isinstance(reference, str):
            return getattr(self, reference, None)
        if isinstance(reference, PretrainedConfig):
            return reference
        reference = dict(reference)
        return AutoConfig.for_model(reference.pop("model_type"), **reference)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

# Modules kept out of 8-bit quantisation: both visual experts and the language model's head.
INT8_SKIP_MODULES = ["captioner", "chart_reader", "lm_head"]


def int8_quantization_config(expert_modules=()):
    """The bitsandbytes 8-bit config for a bundle: only the language model's blocks are quantised.

    ``expert_modules`` names the modules of experts added in the config, which stay unquantised too.
    """
    from transformers import BitsAndBytesConfig

    skip = list(dict.fromkeys([*INT8_SKIP_MODULES, *expert_modules]))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _write_portable_processor_layout(processor, folder: str) -> None:
    """Rewrite a saved processor in the layout every transformers from 4.51 to 5.x reads.

    transformers 5 nests the image processor inside ``processor_config.json``; 4.x reads it from
    ``preprocessor_config.json`` and passes any nested entry to the processor's constructor a second time
    (``TypeError: got multiple values for argument 'image_processor'``). 5.x still reads the separate file, so the
    image processor is saved on its own and the nested copy removed.
    """
    import json
    import os

    config_file = os.path.join(folder, "processor_config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        saved = json.load(handle)
    nested = [name for name, value in saved.items() if isinstance(value, dict) and name.endswith("image_processor")]
    if not nested:
        return
    for name in nested:
        getattr(processor, name).save_pretrained(folder)  # preprocessor_config.json
        del saved[name]
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(saved, handle, indent=2, sort_keys=True)


def int8_default_dtype(device_map=None) -> torch.dtype:
    """The dtype of the unquantised parts when 8-bit is requested without one.

    float16, the dtype LLM.int8's matmuls compute in (so its inputs need no per-call cast), or bfloat16 on a CUDA
    device that supports it (same memory, float32's range). ``device_map`` keeping everything on the CPU means CPU.
    """
    placements = device_map.values() if isinstance(device_map, dict) else [device_map]
    on_cpu_only = device_map is not None and all(str(place) == "cpu" for place in placements)
    if torch.cuda.is_available() and not on_cpu_only and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class VisualMedAlpacaPreTrainedModel(PreTrainedModel):
    config_class = VisualMedAlpacaConfig
    base_model_prefix = "visual_med_alpaca"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # device_map="auto" must never split one of these blocks across devices.
    _no_split_modules = [
        "GitLayer",
        "GitVisionEncoderLayer",
        "LlamaDecoderLayer",
        "Pix2StructVisionLayer",
        "Pix2StructTextBlock",
    ]
    _skip_keys_device_placement = "past_key_values"


class VisualMedAlpacaModel(VisualMedAlpacaPreTrainedModel):
    """Med-GIT captioner + Med-Alpaca language model (+ optional DePlot chart reader).

    Submodules keep their own classes and names, so each can be exported and served alone:
    ``captioner`` (`GitForCausalLM`), ``language_model`` (`AutoModelForCausalLM`) and
    ``chart_reader`` (`Pix2StructForConditionalGeneration`, optional). The visual experts are built
    from ``config.experts`` (one submodule per entry, named by its ``module``), so a bundle adds an
    expert by adding an entry.
    """

    def __init__(self, config: VisualMedAlpacaConfig):
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # One submodule per configured expert, named by its entry (``captioner``, ``chart_reader`` ...);
        # an expert without a sub-config is absent from this bundle (its attribute is None).
        for name, spec in config.experts.items():
            expert_config = config.expert_model_config(name)
            module = None
            if expert_config is not None:
                model_class = getattr(transformers, spec["model_class"], None)
                if model_class is None:
                    raise ModelLoadError(
                        f"Expert '{name}' names model_class '{spec['model_class']}', which this transformers "
                        f"version does not have ({transformers.__version__}); fix config.experts."
                    )
                module = model_class(expert_config)
            setattr(self, spec["module"], module)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, load_in_8bit: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` plus a ``load_in_8bit=True`` convenience.

        ``load_in_8bit`` builds ``BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=...)`` that
        quantises the language model's blocks only: the visual experts and the LM head stay unquantised
        (``llm_int8_skip_modules`` replaces bitsandbytes' default list, so all of them are named). Without a
        ``dtype`` those unquantised parts load in 16 bit (``int8_default_dtype``): float16, or bfloat16 on a
        CUDA device that supports it.
        """
        if load_in_8bit:
            if kwargs.get("quantization_config") is not None:
                raise UnknownParameterError("Pass either load_in_8bit=True or quantization_config, not both.")
            config = kwargs.get("config")
            if not isinstance(config, VisualMedAlpacaConfig):
                location = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
                config = VisualMedAlpacaConfig.from_pretrained(pretrained_model_name_or_path, **location)
            modules = [spec["module"] for spec in config.experts.values()]
            kwargs["quantization_config"] = int8_quantization_config(modules)
            # No dtype given (pipeline() passes "auto"): the unquantised parts (experts, embeddings, norms, head)
            # in 16 bit as bitsandbytes users expect, not in the checkpoint's (possibly float32) dtype.
            if kwargs.get("dtype") in (None, "auto") and kwargs.get("torch_dtype") in (None, "auto"):
                kwargs.pop("torch_dtype", None)
                kwargs["dtype"] = int8_default_dtype(kwargs.get("device_map"))
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # Where the expert processors live: the same folder/repo at the same revision.
        model._bundle_source = {
            "name_or_path": str(pretrained_model_name_or_path),
            **{k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs},
        }
        # pipeline() hands over huggingface_hub's ResolvedRevision (a str equal to what was asked, e.g. "main"):
        # keep the commit it resolved to, so the processors come from exactly the weights' commit.
        resolved = getattr(model._bundle_source.get("revision"), "resolved", None)
        if resolved:
            model._bundle_source["revision"] = str(resolved)
        return model

    def load_expert_processors(self) -> dict:
        """The processors saved beside the weights, one per present expert (``captioner/``, ``chart_reader/`` ...)."""
        source = getattr(self, "_bundle_source", None) or {"name_or_path": self.name_or_path}
        location = dict(source)
        name_or_path = location.pop("name_or_path")
        processors = {}
        # Explicit classes: AutoProcessor would read the root config without trust_remote_code and prompt.
        for expert in self.available_experts:
            spec = self.config.experts[expert]
            subfolder = spec["processor_subfolder"]
            try:
                processor_class = getattr(transformers, spec["processor_class"])
                processors[expert] = processor_class.from_pretrained(name_or_path, subfolder=subfolder, **location)
            except (AttributeError, OSError, ValueError) as error:
                raise ModelLoadError(
                    f"Could not load the {expert} expert's processor from the '{subfolder}/' folder of the bundle "
                    f"({type(error).__name__}). Re-create the bundle or pass the processor explicitly."
                ) from None
        return processors

    def load_language_tokenizer(self):
        """The language model's tokenizer from the bundle root (for transformers that do not load it for the pipeline).

        transformers 4.x's ``pipeline()`` loads a tokenizer only for configs it knows, and cannot resolve the generic
        ``TokenizersBackend`` class that transformers 5 writes into ``tokenizer_config.json``: then the fast
        tokenizer is read straight from ``tokenizer.json`` (the same vocabulary, special tokens and chat template).
        """
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        location = dict(getattr(self, "_bundle_source", None) or {"name_or_path": self.name_or_path})
        name_or_path = location.pop("name_or_path")
        try:
            return AutoTokenizer.from_pretrained(name_or_path, **location)
        except ValueError:  # a tokenizer class this transformers does not have
            try:
                return PreTrainedTokenizerFast.from_pretrained(name_or_path, **location)
            except (OSError, ValueError) as error:
                raise ModelLoadError(
                    f"Could not load the language model's tokenizer from the bundle root ({type(error).__name__})."
                ) from None
        except OSError as error:
            raise ModelLoadError(
                f"Could not load the language model's tokenizer from the bundle root ({type(error).__name__})."
            ) from None

    def save_expert_processors(
        self, save_directory, captioner_processor=None, chart_processor=None, **processors_by_expert
    ) -> None:
        """Write the experts' processors where ``load_expert_processors`` finds them, each beside its config.

        The config makes each subfolder self-describing: ``AutoTokenizer`` (inside ``GitProcessor``) reads
        ``<subfolder>/config.json`` first, and from a Hub cache with ``HF_HUB_OFFLINE=1`` a missing one is a
        hard error, not a fallback.
        """
        import os

        processors = {EXPERT_RADIOLOGY: captioner_processor, EXPERT_CHART: chart_processor, **processors_by_expert}
        for expert, processor in processors.items():
            if processor is not None:
                subfolder = self.config.experts[expert]["processor_subfolder"]
                processor.save_pretrained(os.path.join(save_directory, subfolder))
                _write_portable_processor_layout(processor, os.path.join(save_directory, subfolder))
                module = self.expert_module(expert)
                if module is not None:
                    module.config.save_pretrained(os.path.join(save_directory, subfolder))

    def expert_module(self, name: str) -> nn.Module | None:
        """The weights of expert ``name`` (``None`` when this bundle does not include it)."""
        spec = self.config.experts.get(name)
        return None if spec is None else getattr(self, spec["module"], None)

    @property
    def available_experts(self) -> tuple[str, ...]:
        """The configured experts whose weights are in this bundle, in config order."""
        return tuple(name for name in self.config.experts if self.expert_module(name) is not None)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Score a tokenised prompt with the language model (the last stage of the chain)."""
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def caption_images(self, pixel_values: torch.FloatTensor, **generate_kwargs) -> torch.LongTensor:
        """Radiology expert: caption token ids for a batch of images (GIT image-processor output)."""
        generate_kwargs.setdefault("max_new_tokens", self.config.caption_max_new_tokens)
        pixel_values = pixel_values.to(device=self.captioner.device, dtype=self.captioner.dtype)
        return self.captioner.generate(pixel_values=pixel_values, **generate_kwargs)

    @torch.no_grad()
    def read_charts(
        self, flattened_patches: torch.FloatTensor, attention_mask: torch.Tensor, **generate_kwargs
    ) -> torch.LongTensor:
        """Chart expert: linearised-table token ids for a batch of charts (Pix2Struct processor output)."""
        if self.chart_reader is None:
            raise ExpertUnavailableError(
                "This bundle has no chart reader (DePlot); route charts to the captioner or add one to the bundle."
            )
        generate_kwargs.setdefault("max_new_tokens", self.config.chart_max_new_tokens)
        device = self.chart_reader.device
        return self.chart_reader.generate(
            flattened_patches=flattened_patches.to(device=device, dtype=self.chart_reader.dtype),
            attention_mask=attention_mask.to(device),
            **generate_kwargs,
        )

    @torch.no_grad()
    def generate_answer(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, **generate_kwargs
    ) -> torch.LongTensor:
        """Language model: answer token ids only (the prompt is cut off), for left-padded prompts."""
        generate_kwargs.setdefault("max_new_tokens", self.config.answer_max_new_tokens)
        device = self.language_model.get_input_embeddings().weight.device
        sequences = self.language_model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **generate_kwargs
        )
        return sequences[:, input_ids.shape[1] :]


VisualMedAlpacaConfig.register_for_auto_class()
VisualMedAlpacaModel.register_for_auto_class("AutoModel")

__all__ = [
    "ALPACA_CHAT_TEMPLATE",
    "DISCLAIMER",
    "DicomDecoderMissingError",
    "EXPERTS",
    "EXPERT_CHART",
    "EXPERT_RADIOLOGY",
    "DEFAULT_EXPERT_SPECS",
    "PROMPT_TEMPLATES",
    "INT8_SKIP_MODULES",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "ExpertUnavailableError",
    "ImageInputError",
    "ImageTooLargeError",
    "ImageURLNotAllowedError",
    "InputError",
    "InvalidImageError",
    "MissingQuestionError",
    "ModelLoadError",
    "PayloadTooLargeError",
    "UnknownParameterError",
    "UnsupportedImageFormatError",
    "VisualMedAlpacaConfig",
    "VisualMedAlpacaError",
    "VisualMedAlpacaModel",
    "VisualMedAlpacaPreTrainedModel",
    "build_follow_up_prompt",
    "build_inference_prompt",
    "build_training_prompt",
    "int8_default_dtype",
    "int8_quantization_config",
    "neutralize_template_markers",
]
