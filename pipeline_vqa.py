"""The ``visual-med-alpaca`` pipeline: image + question -> visual expert -> Alpaca prompt -> answer.

Remote code: copied into the published Hub repository and imported by ``trust_remote_code``.

    >>> from transformers import pipeline
    >>> vqa = pipeline(model="org/visual-med-alpaca", trust_remote_code=True, device_map="auto")
    >>> vqa({"image": "chest.png", "question": "What abnormality is seen?"})
    {'answer': ..., 'expert': 'radiology', 'intermediate_text': ..., 'disclaimer': ..., 'warnings': [...]}
    >>> vqa({"question": "What are the chemicals that treat hair loss?"})           # no image
    >>> vqa([{"image": a, "question": q1}, {"image": b, "question": q2}], batch_size=8)

Every input yields one record: ``answer``, ``expert`` (``"radiology"``, ``"chart"`` or ``None``),
``intermediate_text`` (exactly the caption/table the language model was given), ``image_metadata``
(technical fields of the image only — never patient identity), ``routing`` (which expert the router
chose, its score and how: ``statistics``, ``zero-shot``, ``forced`` or ``dicom``; ``None`` without an
image), ``backend`` (which language model answered: ``"local"`` or
``"openai:MODEL"``), ``intermediate_cached`` (``True`` when the intermediate text was reused instead of being
produced by the expert for this request), ``prompt`` (with ``return_prompt=True``), ``disclaimer`` and ``warnings``.

Experts are plug-ins (``visual_experts.py``, described in ``config.experts``); the router
(``image_router.py``) picks one per image unless the caller forces it with ``expert=...``.

The language model is the bundle's own by default; ``backend={"type": "openai", "base_url": ..., "model": ...,
"api_key_env": ...}`` (or ``config.language_backend``) sends the same prompt to an OpenAI-compatible server
instead (see ``language_backends.py``).

Follow-up questions (multi-turn): a request may carry ``history``, the earlier turns about the same case
oldest first as ``{"question": ..., "answer": ...}`` dicts, and ``intermediate_text``, the image's text
from the first turn's record (with its ``expert``), so the visual expert is not run again::

    >>> first = vqa({"image": "chest.png", "question": "What abnormality is seen?"})
    >>> vqa({"question": "Which side?", "expert": first["expert"], "intermediate_text": first["intermediate_text"],
    ...      "history": [{"question": "What abnormality is seen?", "answer": first["answer"]}]})

The prompt format is ``build_follow_up_prompt`` in ``modeling_visual_med_alpaca.py``. When the prompt would
exceed ``config.max_prompt_tokens`` the oldest turns are left out (never the instruction, the current
question or the intermediate text) and a warning says how many.

DICOM series and volumes: ``image`` may also be a folder, a ``.zip`` path or zip bytes, a list of paths or bytes
(the files of one series), or an enhanced multi-frame CT/MR file (see ``medical_series.py``). ``series_mode``
(call-time keyword, default ``config.series_mode``): ``"key_slices"`` — ``series_slices`` evenly spaced slices,
each read by the expert in ascending order, the intermediate text one labelled line per slice
(``"Slice 3 of 5 (7 of 12): ..."``); ``"middle"``; ``"montage"`` — the key slices tiled into one image, read once.
``image_metadata["series"]`` = ``{"slices", "selected" (1-based), "spacing_mm", "mode"}``.

Streaming (local language model): ``for chunk in vqa.stream(request): ...`` yields the answer's text
pieces as they are generated, then, last, the full record (a dict).

Batching: preprocess returns plain Python values plus per-image tensors wrapped in a dict, which the
pipeline collate passes through as lists; ``_forward`` batches captioning and answering itself, with
left padding, so the greedy answers of a batch equal those computed one at a time. A list longer than
``batch_size`` is ordered by estimated prompt length before batching (``group_by_length=False`` turns it off)
and the records come back in input order.

Intermediate-text cache: the experts' texts are kept in a bounded LRU map (``config.intermediate_cache_size``,
default 256; ``pipeline(..., intermediate_cache_size=N)`` overrides it, ``0`` disables it), keyed by

- a digest of the decoded image (pixels, mode and size after loading and DICOM windowing): the same pixels in
  PNG, a path, bytes or a PIL image hit alike, and no DICOM header field, file name or question enters the key;
- the expert's name and its weights' revision: the bundle's Hub commit when it was loaded from the Hub or its
  cache, otherwise a digest of the expert's weights (computed once per pipeline, about a second per GB), so
  other weights never reuse a text. After changing weights in place, call ``vqa.intermediate_cache.clear()``;
- the caption generation settings (``caption_generate_kwargs`` and the expert's defaults).

Only digests and expert texts are stored. Repeats of an image inside one batch are read once too.
``vqa.intermediate_cache.hits`` / ``.misses`` count lookups.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from typing import Any

import torch
from transformers import GenerationConfig, Pipeline, StoppingCriteria, TextIteratorStreamer

try:
    from .image_router import MODE_DICOM, MODE_FORCED, RoutingDecision, build_router
    from .language_backends import BACKEND_LOCAL, backend_name, get_backend, parse_backend, request_options
    from .medical_image import LoadedImage, dicom_prompt_context, load_image, parse_ct_windows
    from .medical_series import check_series_options, is_series_source, load_series
    from .modeling_visual_med_alpaca import (
        DISCLAIMER,
        EXPERT_CHART,
        EXPERT_RADIOLOGY,
        ExpertUnavailableError,
        InputError,
        InvalidImageError,
        MissingQuestionError,
        UnknownParameterError,
        build_follow_up_prompt,
        neutralize_template_markers,
    )
    from .visual_experts import build_experts
except ImportError:  # imported from a checkout as a top-level module
    from image_router import MODE_DICOM, MODE_FORCED, RoutingDecision, build_router
    from language_backends import BACKEND_LOCAL, backend_name, get_backend, parse_backend, request_options
    from medical_image import LoadedImage, dicom_prompt_context, load_image, parse_ct_windows
    from medical_series import check_series_options, is_series_source, load_series
    from modeling_visual_med_alpaca import (
        DISCLAIMER,
        EXPERT_CHART,
        EXPERT_RADIOLOGY,
        ExpertUnavailableError,
        InputError,
        InvalidImageError,
        MissingQuestionError,
        UnknownParameterError,
        build_follow_up_prompt,
        neutralize_template_markers,
    )
    from visual_experts import build_experts

TASK = "visual-med-alpaca"
# The published bundle the task defaults to. Pinned: whoever publishes puts the commit sha that publish_bundle.py
# prints after its push here, so the default never changes under a user. (This offline development environment
# could not push one; "org/visual-med-alpaca" is the id the README's publish command uses.)
PUBLISHED_MODEL_ID = "org/visual-med-alpaca"
PUBLISHED_REVISION = "main"
# The record contract every surface (pipeline, CLI, app, endpoint) returns; ``prompt`` is added on request.
RECORD_KEYS = frozenset(
    {
        "answer",
        "expert",
        "intermediate_text",
        "intermediate_cached",
        "image_metadata",
        "routing",
        "backend",
        "disclaimer",
        "warnings",
    }
)
INPUT_KEYS = frozenset({"image", "question", "expert", "history", "intermediate_text"})
HISTORY_TRIMMED_WARNING = (
    "The conversation was too long for the language model's context: the {count} oldest turn(s) were left out "
    "of the prompt (the instruction, the current question and the image's text are always kept)."
)
# Keywords of GenerationConfig that a caller may set for the answer.
GENERATION_KEYS = frozenset(key for key in vars(GenerationConfig()) if not key.startswith("_")) - {
    "transformers_version",
}
DICOM_ROUTING_WARNING = "DICOM images are always read by the radiology expert; the requested chart expert was not used."
CHART_FALLBACK_WARNING = (
    "This bundle has no chart reader (DePlot): the chart was described by the radiology captioner instead."
)
NO_EXPERT_WARNING = (
    "The image looks like neither a radiology image nor a chart, so no visual expert read it and the question "
    "was answered without it. Pass expert='radiology' or expert='chart' to force one."
)

# A Hub commit hash: the bundle's revision when it was loaded from the Hub or its cache.
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SNAPSHOT_COMMIT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")


class IntermediateTextCache:
    """A bounded (LRU) map from (image content hash, expert, weights revision, generation settings) to the text
    the expert produced for that image.

    Only digests and expert texts are stored: never the image, its file name, its DICOM header or the question.
    ``maxsize=0`` disables it: every image is read by its expert, even the same image twice in one batch.
    ``hits`` / ``misses`` count lookups (a repeat of an image within one batch counts as a hit).
    Thread-safe (a server may answer several requests at once).
    """

    def __init__(self, maxsize: int):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 0:
            raise InputError("intermediate_cache_size must be an integer >= 0 (0 disables the cache).")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._texts: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.maxsize > 0

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: tuple) -> str | None:
        with self._lock:
            text = self._texts.get(key)
            if text is None:
                self.misses += 1
            else:
                self.hits += 1
                self._texts.move_to_end(key)
            return text

    def count_hit(self) -> None:
        with self._lock:
            self.hits += 1

    def put(self, key: tuple, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._texts[key] = text
            self._texts.move_to_end(key)
            while len(self._texts) > self.maxsize:
                self._texts.popitem(last=False)

    def clear(self) -> None:
        """Forget every text and reset the counters (e.g. after changing an expert's weights in place)."""
        with self._lock:
            self._texts.clear()
            self.hits = self.misses = 0


def image_content_hash(image) -> str:
    """Digest of the decoded pixels, mode and size: the same pixels hash alike whatever the container (PNG, JPEG
    re-encoded losslessly, base64, bytes, a path). For DICOM it is taken after decoding and windowing, from the
    pixels only, so no header field (and no patient identifier) enters it."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, dtypes, shapes, values): the expert's revision when the
    bundle was not loaded from the Hub. Computed once per expert per pipeline (about a second per GB)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        if tensor.device.type == "meta":  # offloaded weights: their values are not in memory here
            digest.update(f"meta:{id(module)}".encode())
            continue
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class VisualMedAlpacaPipeline(Pipeline):
    """Visual question answering for biomedical images (Med-GIT / DePlot experts + Med-Alpaca)."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    # Generation is driven by _forward itself (two models, two generate calls).
    _pipeline_calls_generate = False

    def __init__(
        self,
        *args,
        captioner_processor=None,
        chart_processor=None,
        expert_processors=None,
        image_router=None,
        intermediate_cache_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None and getattr(self.model, "load_language_tokenizer", None) is not None:
            self.tokenizer = self.model.load_language_tokenizer()  # transformers 4.x's pipeline() does not load it
        if self.tokenizer is None:
            raise InputError("The pipeline needs the language model's tokenizer (saved at the bundle root).")
        # Generation with a batch of prompts needs left padding so every answer starts at the same column.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        given = {EXPERT_RADIOLOGY: captioner_processor, EXPERT_CHART: chart_processor, **(expert_processors or {})}
        given = {name: processor for name, processor in given.items() if processor is not None}
        processors = {} if given else self.model.load_expert_processors()
        processors.update(given)
        self.experts = build_experts(self.model, processors)
        self.captioner_processor = processors.get(EXPERT_RADIOLOGY)
        self.chart_processor = processors.get(EXPERT_CHART) if EXPERT_CHART in self.experts else None
        config = self.model.config
        self.image_router = image_router or build_router(
            config.router_mode,
            model=config.router_model,
            labels={name: spec["router_label"] for name, spec in config.experts.items() if spec.get("router_label")},
        )
        # Intermediate texts by image content: several questions about one image run its expert once.
        if intermediate_cache_size is None:
            intermediate_cache_size = getattr(config, "intermediate_cache_size", 0)
        self.intermediate_cache = IntermediateTextCache(intermediate_cache_size)
        self._expert_revisions: dict[str, str] = {}

    # ------------------------------------------------------------------ parameters

    def _sanitize_parameters(
        self,
        expert: str | None = None,
        return_prompt: bool | None = None,
        dicom_context: bool | None = None,
        ct_windows=None,
        generate_kwargs: dict | None = None,
        caption_generate_kwargs: dict | None = None,
        backend: str | dict | None = None,
        series_mode: str | None = None,
        series_slices: int | None = None,
        **kwargs,
    ):
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}

        if expert is not None:
            preprocess_params["expert"] = _check_expert_name(expert, self.model.config.experts)
        if series_mode is not None or series_slices is not None:
            config = self.model.config
            series_mode = series_mode if series_mode is not None else config.series_mode
            series_slices = series_slices if series_slices is not None else config.series_slices
            check_series_options(series_mode, series_slices)
            preprocess_params.update(series_mode=series_mode, series_slices=series_slices)
        if return_prompt is not None:
            postprocess_params["return_prompt"] = bool(return_prompt)
        if dicom_context:
            forward_params["dicom_context"] = True
        if ct_windows is not None:  # checked now, so a bad value fails before any image is read
            preprocess_params["ct_windows"] = parse_ct_windows(ct_windows)

        unknown = sorted(set(kwargs) - GENERATION_KEYS)
        if unknown:
            raise UnknownParameterError(
                f"Unknown parameter(s): {', '.join(unknown)}. Accepted: expert, return_prompt, dicom_context, "
                "ct_windows, generate_kwargs, caption_generate_kwargs, backend, series_mode, series_slices, and "
                "GenerationConfig keywords such as "
                "max_new_tokens or num_beams. "
                "Loading options (load_in_8bit, dtype, device_map) go to pipeline(...)/model_kwargs instead."
            )
        answer_kwargs = dict(generate_kwargs or {})
        conflicts = sorted(set(kwargs) & set(answer_kwargs))
        if conflicts:
            raise UnknownParameterError(
                f"Parameter(s) {', '.join(conflicts)} given both directly and in generate_kwargs; give each once."
            )
        answer_kwargs.update(kwargs)
        bad = sorted(set(answer_kwargs) - GENERATION_KEYS)
        if bad:
            raise UnknownParameterError(f"generate_kwargs holds unknown generation parameter(s): {', '.join(bad)}.")
        if answer_kwargs:
            forward_params["generate_kwargs"] = answer_kwargs
        # Given here (at call or construction time) it wins; otherwise _answer uses config.language_backend.
        if backend is not None:
            forward_params["backend"] = parse_backend(backend) or BACKEND_LOCAL
        if parse_backend(backend if backend is not None else self.model.config.language_backend) is not None:
            request_options(answer_kwargs, self.model.config.answer_max_new_tokens)  # refuse what it cannot honour
        if caption_generate_kwargs:
            bad = sorted(set(caption_generate_kwargs) - GENERATION_KEYS)
            if bad:
                raise UnknownParameterError(f"caption_generate_kwargs holds unknown parameter(s): {', '.join(bad)}.")
            forward_params["caption_generate_kwargs"] = dict(caption_generate_kwargs)
        return preprocess_params, forward_params, postprocess_params

    # ------------------------------------------------------------------ entry point

    def __call__(self, inputs=None, group_by_length: bool = True, **kwargs):
        """Answer one request (dict), or a list of them; a plain string is a text-only question.

        A list is answered in batches of ``batch_size``; with ``group_by_length`` (default) requests of similar
        prompt length are batched together to cut padding, and the records still come back in input order.
        """
        if inputs is None and "question" in kwargs:
            inputs = {"question": kwargs.pop("question"), "image": kwargs.pop("image", None)}
        if not isinstance(inputs, (list, tuple)):
            return super().__call__(_normalise_request(inputs, self.model.config.experts), **kwargs)
        if not inputs:
            return []
        inputs = [_normalise_request(item, self.model.config.experts) for item in inputs]
        batch_size = kwargs.get("batch_size") or self._batch_size or 1
        if not group_by_length or len(inputs) <= batch_size:  # one batch: nothing to group
            return super().__call__(inputs, **kwargs)
        order = sorted(range(len(inputs)), key=lambda i: self._prompt_length_estimate(inputs[i]))
        records = super().__call__([inputs[i] for i in order], **kwargs)
        in_input_order = [None] * len(inputs)
        for position, index in enumerate(order):
            in_input_order[index] = records[position]
        return in_input_order

    def _prompt_length_estimate(self, request: dict) -> int:
        """Tokens of the prompt's known parts; an image adds its expert's text, at most caption_max_new_tokens."""
        parts = [request["question"], request.get("intermediate_text") or ""]
        parts += [text for turn in request.get("history") or () for text in (turn["question"], turn["answer"])]
        length = len(self.tokenizer("\n".join(parts), add_special_tokens=False)["input_ids"])
        if request.get("image") is not None and request.get("intermediate_text") is None:
            length += self.model.config.caption_max_new_tokens
        return length

    # ------------------------------------------------------------------ stages

    def preprocess(
        self,
        request: dict,
        expert: str | None = None,
        ct_windows=None,
        series_mode: str | None = None,
        series_slices: int | None = None,
    ) -> dict:
        warnings: list[str] = []
        question, changed = neutralize_template_markers(request["question"].strip())
        if changed:
            warnings.append("Prompt-template markers in the question were neutralised.")
        requested = request.get("expert") or expert
        image_features = None
        chosen = None
        routing = None
        image_metadata: dict = {}
        image_hash = None
        slice_labels = None
        history, precomputed_text = self._conversation(request, warnings)
        if precomputed_text is not None:
            # A follow-up about an image already read: reuse its text, do not run the expert again.
            chosen = requested if requested in self.experts else EXPERT_RADIOLOGY
        elif request.get("image") is not None and requested == "none":
            routing = RoutingDecision(expert=None, score=None, mode=MODE_FORCED).as_record()
        elif request.get("image") is not None:
            if ct_windows is None:
                ct_windows = getattr(self.model.config, "ct_windows", None)
            # A series' key slices are read one by one, in ascending order, each labelled in the text.
            images, slice_labels = self._load_images(request["image"], series_mode, series_slices, ct_windows, warnings)
            loaded: LoadedImage = images[0]
            image_metadata = dict(loaded.metadata)
            decision = self._route(loaded, requested, warnings)
            routing = decision.as_record()
            chosen = decision.expert
            if chosen is None:
                warnings.append(NO_EXPERT_WARNING)
            elif chosen not in self.experts:
                # A configured expert this bundle lacks (typically the chart reader): the captioner reads it.
                warnings.append(
                    CHART_FALLBACK_WARNING
                    if chosen == EXPERT_CHART
                    else f"This bundle has no '{chosen}' expert: the radiology captioner read the image instead."
                )
                chosen = EXPERT_RADIOLOGY
            if chosen is not None:
                features = [self.experts[chosen].prepare(image.image) for image in images]
                hashes = [
                    image_content_hash(image.image) if self.intermediate_cache.enabled else None for image in images
                ]
                image_features, image_hash = (features, hashes) if slice_labels else (features[0], hashes[0])
        elif requested is not None and requested != "none":
            warnings.append(f"expert={requested!r} was requested but no image was given; answered without one.")
        # Values are plain Python / dicts so the default collate passes them through as lists.
        return {
            "question": question,
            "expert": chosen,
            "routing": routing,
            "image_features": image_features,
            "image_hash": image_hash,
            "slice_labels": slice_labels,
            "image_metadata": image_metadata,
            "warnings": warnings,
            "history": history,
            "precomputed_text": precomputed_text,
        }

    def _load_images(
        self, image, series_mode, series_slices, ct_windows, warnings: list[str]
    ) -> tuple[list[LoadedImage], list[str] | None]:
        """One loaded image, or the selected slices of a series and their labels (see medical_series.py)."""
        if not is_series_source(image):
            loaded = load_image(image, ct_windows=ct_windows)
            warnings.extend(loaded.warnings)
            return [loaded], None
        config = self.model.config
        series = load_series(
            image,
            series_mode=series_mode or config.series_mode,
            series_slices=series_slices or config.series_slices,
            ct_windows=ct_windows,
        )
        warnings.extend(series.warnings)
        return series.images, series.labels

    def _route(self, loaded: LoadedImage, requested: str | None, warnings: list[str]) -> RoutingDecision:
        """Who reads the image: the caller's choice, radiology for DICOM, else the router's decision."""
        if loaded.is_dicom:  # before the caller's choice: DICOM is always radiology
            if requested not in (None, EXPERT_RADIOLOGY):
                warnings.append(DICOM_ROUTING_WARNING)
            return RoutingDecision(expert=EXPERT_RADIOLOGY, score=1.0, mode=MODE_DICOM)
        if requested is not None:
            return RoutingDecision(expert=requested, score=1.0, mode=MODE_FORCED)
        return self.image_router.route(loaded.image)

    @staticmethod
    def _conversation(request: dict, warnings: list[str]) -> tuple[list[dict], str | None]:
        """The request's earlier turns and precomputed intermediate text, with template markers defused."""
        history, changed = [], False
        for turn in request.get("history") or ():
            question, question_changed = neutralize_template_markers(turn["question"].strip())
            answer, answer_changed = neutralize_template_markers(turn["answer"].strip())
            changed = changed or question_changed or answer_changed
            history.append({"question": question, "answer": answer})
        if changed:
            warnings.append("Prompt-template markers in the conversation history were neutralised.")
        precomputed_text = request.get("intermediate_text")
        if precomputed_text is not None:
            precomputed_text, text_changed = neutralize_template_markers(precomputed_text.strip())
            if text_changed:
                warnings.append("Prompt-template markers in the given intermediate text were neutralised.")
        return history, precomputed_text

    def _forward(
        self,
        model_inputs: dict,
        generate_kwargs=None,
        caption_generate_kwargs=None,
        dicom_context: bool = False,
        backend=None,
    ) -> dict:
        batched = isinstance(model_inputs["question"], list)
        questions = model_inputs["question"] if batched else [model_inputs["question"]]
        experts = model_inputs["expert"] if batched else [model_inputs["expert"]]
        features = model_inputs["image_features"] if batched else [model_inputs["image_features"]]
        warnings = [list(w) for w in (model_inputs["warnings"] if batched else [model_inputs["warnings"]])]
        metadata = model_inputs["image_metadata"] if batched else [model_inputs["image_metadata"]]
        histories = model_inputs["history"] if batched else [model_inputs["history"]]
        precomputed = model_inputs["precomputed_text"] if batched else [model_inputs["precomputed_text"]]
        image_hashes = model_inputs["image_hash"] if batched else [model_inputs["image_hash"]]
        slice_labels = model_inputs["slice_labels"] if batched else [model_inputs["slice_labels"]]

        intermediate_texts, cached = self._intermediate_texts(
            [None if text is not None else name for name, text in zip(experts, precomputed, strict=True)],
            features,
            warnings,
            caption_generate_kwargs or {},
            image_hashes,
            slice_labels,
        )
        intermediate_texts = [
            text if text is not None else computed
            for text, computed in zip(precomputed, intermediate_texts, strict=True)
        ]
        if dicom_context:
            # Allowlisted, VR-validated DICOM fields ("Modality: CT. Body part: HEAD.") lead the expert's text,
            # so intermediate_text stays exactly what the language model is given.
            for i, text in enumerate(intermediate_texts):
                context = dicom_prompt_context(metadata[i]) if text is not None and precomputed[i] is None else None
                if context:
                    intermediate_texts[i] = f"{context} {text}".strip()
        prompts = self._build_prompts(questions, intermediate_texts, histories, warnings)
        backend = parse_backend(backend if backend is not None else self.model.config.language_backend)
        answers = self._answer(prompts, generate_kwargs or {}, backend)
        outputs = {
            "answer": answers,
            "backend": [backend_name(backend)] * len(answers),
            "expert": experts,
            "image_metadata": metadata,
            "routing": model_inputs["routing"] if batched else [model_inputs["routing"]],
            "intermediate_text": intermediate_texts,
            "intermediate_cached": cached,
            "prompt": prompts,
            "warnings": warnings,
        }
        if not batched:
            return {key: value[0] for key, value in outputs.items()}
        return outputs

    def _intermediate_texts(
        self,
        experts: list,
        features: list,
        warnings: list[list[str]],
        generate_kwargs: dict,
        image_hashes: list | None = None,
        slice_labels: list | None = None,
    ) -> tuple[list[str | None], list[bool]]:
        """Visual-expert stage, per input; a series' key slices (``slice_labels[i]`` set, ``features[i]`` and
        ``image_hashes[i]`` lists) are read in the same batch, and their texts joined one labelled line each."""
        image_hashes = image_hashes or [None] * len(experts)
        slice_labels = slice_labels or [None] * len(experts)
        owners, flat_experts, flat_features, flat_hashes = [], [], [], []
        for i, labels in enumerate(slice_labels):
            count = len(labels) if labels else 1
            owners += [i] * count
            flat_experts += [experts[i]] * count
            flat_features += features[i] if labels else [features[i]]
            flat_hashes += image_hashes[i] if labels else [image_hashes[i]]
        flat_warnings = [warnings[i] for i in owners]  # the same lists: a slice's warning is its input's
        texts, cached = self._read_images(flat_experts, flat_features, flat_warnings, generate_kwargs, flat_hashes)
        joined: list[str | None] = []
        all_cached: list[bool] = []
        for i, labels in enumerate(slice_labels):
            positions = [k for k, owner in enumerate(owners) if owner == i]
            if labels and texts[positions[0]] is not None:
                joined.append("\n".join(f"{label}: {texts[k]}" for label, k in zip(labels, positions, strict=True)))
            else:
                joined.append(texts[positions[0]])
            all_cached.append(all(cached[k] for k in positions))
        for row, labels in zip(warnings, slice_labels, strict=True):
            if labels:  # one warning per input, not one per slice
                row[:] = list(dict.fromkeys(row))
        return joined, all_cached

    def _read_images(
        self,
        experts: list,
        features: list,
        warnings: list[list[str]],
        generate_kwargs: dict,
        image_hashes: list | None = None,
    ) -> tuple[list[str | None], list[bool]]:
        """Visual-expert stage: one batched run per expert over the images it has not read yet.

        Returns the texts in input order and, per input, whether its text was reused (from the cache, or from
        the same image earlier in this batch) instead of being produced by the expert for it.
        """
        intermediate_texts: list[str | None] = [None] * len(experts)
        cached = [False] * len(experts)
        image_hashes = image_hashes or [None] * len(experts)
        cache = self.intermediate_cache
        for expert_name in self.experts:
            indices = [i for i, name in enumerate(experts) if name == expert_name]
            if not indices:
                continue
            raw_texts: dict[int, str] = {}
            to_read: list[list[int]] = []  # one list per expert run: the inputs that share that image
            by_key: dict[tuple, list[int]] = {}
            # Everything but the pixels is the same for this expert run: build it once, not per image.
            scope = self._cache_scope(expert_name, generate_kwargs) if cache.enabled else None
            keys = {i: None if scope is None or image_hashes[i] is None else (image_hashes[i], *scope) for i in indices}
            for i in indices:
                key = keys[i]
                if key is None:
                    to_read.append([i])
                elif key in by_key:  # the same image earlier in this batch
                    cache.count_hit()
                    by_key[key].append(i)
                elif (text := cache.get(key)) is not None:
                    raw_texts[i], cached[i] = text, True
                else:
                    by_key[key] = [i]
                    to_read.append(by_key[key])
            if to_read:
                texts = self._run_expert(expert_name, [features[group[0]] for group in to_read], generate_kwargs)
                for group, text in zip(to_read, texts, strict=True):
                    if keys[group[0]] is not None:
                        cache.put(keys[group[0]], text)
                    for position, i in enumerate(group):
                        raw_texts[i], cached[i] = text, position > 0
            for i, text in raw_texts.items():
                cleaned, changed = neutralize_template_markers(text.strip())
                if changed:
                    warnings[i].append("Prompt-template markers in the expert's text were neutralised.")
                intermediate_texts[i] = cleaned
        return intermediate_texts, cached

    def _cache_scope(self, expert_name: str, generate_kwargs: dict) -> tuple:
        """What an expert's text depends on besides the pixels: the expert, its weights and its generation
        settings. A cache key is ``(image digest, *scope)``."""
        spec = self.experts[expert_name].spec
        config = self.model.config
        settings = json.dumps(
            {
                "generate": generate_kwargs,
                "spec": {key: spec.get(key) for key in ("prompt", "max_new_tokens", "max_patches")},
                "defaults": [config.caption_max_new_tokens, config.chart_max_new_tokens, config.chart_max_patches],
            },
            sort_keys=True,
            default=repr,
        )
        return (expert_name, self._expert_revision(expert_name), settings)

    def _expert_revision(self, expert_name: str) -> str:
        """The expert weights' revision: the bundle's Hub commit when it came from the Hub (or its cache), else a
        fingerprint of the weights themselves (computed once)."""
        if expert_name not in self._expert_revisions:
            source = getattr(self.model, "_bundle_source", None) or {"name_or_path": self.model.name_or_path}
            revision = str(source.get("revision") or "")
            snapshot = _SNAPSHOT_COMMIT.search(str(source.get("name_or_path") or ""))
            if _COMMIT_HASH.fullmatch(revision):
                found = f"commit:{source['name_or_path']}@{revision}"
            elif snapshot:
                found = f"commit:{snapshot.group(1)}"
            else:
                found = f"weights:{weights_fingerprint(self.model.expert_module(expert_name))}"
            self._expert_revisions[expert_name] = found
        return self._expert_revisions[expert_name]

    def _build_prompts(
        self, questions: list[str], intermediate_texts: list, histories: list[list[dict]], warnings: list[list[str]]
    ) -> list[str]:
        """Prompt manager: one Alpaca prompt per request; the oldest turns go first when the context is full."""
        prompts = []
        limit = self.model.config.max_prompt_tokens
        for question, text, history, row_warnings in zip(
            questions, intermediate_texts, histories, warnings, strict=True
        ):
            kept = list(history or ())
            prompt = build_follow_up_prompt(question, text, kept)
            while kept and len(self.tokenizer(prompt)["input_ids"]) > limit:
                kept.pop(0)
                prompt = build_follow_up_prompt(question, text, kept)
            if len(kept) < len(history or ()):
                row_warnings.append(HISTORY_TRIMMED_WARNING.format(count=len(history) - len(kept)))
            prompts.append(prompt)
        return prompts

    def _answer(self, prompts: list[str], generate_kwargs: dict, backend=None) -> list[str]:
        """Language-model stage: left-padded batched greedy/sampled generation, or a remote server's answers."""
        if backend is not None:
            return get_backend(backend).complete(prompts, generate_kwargs, self.model.config.answer_max_new_tokens)
        encoded, answer_kwargs = self._prepare_local_generation(prompts, generate_kwargs)
        answer_ids = self.model.generate_answer(encoded["input_ids"], encoded["attention_mask"], **answer_kwargs)
        return [answer.strip() for answer in self.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)]

    def _prepare_local_generation(self, prompts: list[str], generate_kwargs: dict) -> tuple[dict, dict]:
        """Left-padded prompt tensors (length-checked) and the answer's generate keywords (pad/EOS filled in)."""
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        too_long = int(encoded["attention_mask"].sum(dim=1).max())
        if too_long > self.model.config.max_prompt_tokens:
            raise InputError(
                f"The prompt is {too_long} tokens long; the limit is {self.model.config.max_prompt_tokens}. "
                "Shorten the question."
            )
        answer_kwargs = {"pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs}
        if self.tokenizer.eos_token_id is not None:
            answer_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return encoded, answer_kwargs

    def _run_expert(self, expert_name: str, features: list[dict], generate_kwargs: dict) -> list[str]:
        if expert_name not in self.experts:
            raise ExpertUnavailableError(f"This bundle has no '{expert_name}' expert; use expert='radiology'.")
        return self.experts[expert_name].read(features, **generate_kwargs)

    def postprocess(self, model_outputs: dict, return_prompt: bool = False) -> dict:
        record = {
            "answer": model_outputs["answer"],
            "expert": model_outputs["expert"],
            "intermediate_text": model_outputs["intermediate_text"],
            "intermediate_cached": model_outputs["intermediate_cached"],
            "image_metadata": model_outputs["image_metadata"],
            "routing": model_outputs["routing"],
            "backend": model_outputs["backend"],
            "disclaimer": DISCLAIMER,
            "warnings": list(model_outputs["warnings"]),
        }
        if return_prompt:
            record["prompt"] = model_outputs["prompt"]
        return record

    def describe_image(
        self,
        image,
        expert: str | None = None,
        caption_generate_kwargs: dict | None = None,
        series_mode: str | None = None,
        series_slices: int | None = None,
    ) -> dict:
        """Only the visual-expert stage: ``expert``, ``intermediate_text``, ``image_metadata``, ``warnings``.

        What a follow-up needs to reuse (pass the record's ``intermediate_text`` and ``expert`` back).
        """
        return self.describe_images(
            [{"image": image, "expert": expert}],
            caption_generate_kwargs,
            series_mode=series_mode,
            series_slices=series_slices,
        )[0]

    def describe_images(
        self,
        images: list[dict],
        caption_generate_kwargs: dict | None = None,
        series_mode: str | None = None,
        series_slices: int | None = None,
    ) -> list[dict]:
        """``describe_image`` for a batch of ``{"image", "expert"}`` dicts: one batched run per expert (a server
        groups concurrent requests here). Each record also carries ``routing``."""
        preprocess_params = self._sanitize_parameters(series_mode=series_mode, series_slices=series_slices)[0]
        model_inputs = []
        for item in images:
            if item.get("image") is None:
                raise InvalidImageError("describe_image needs an image.")
            request = {"question": "-", "image": item["image"], "expert": item.get("expert")}
            model_inputs.append(
                self.preprocess(_normalise_request(request, self.model.config.experts), **preprocess_params)
            )
        warnings = [list(inputs["warnings"]) for inputs in model_inputs]
        texts, cached = self._intermediate_texts(
            [inputs["expert"] for inputs in model_inputs],
            [inputs["image_features"] for inputs in model_inputs],
            warnings,
            dict(caption_generate_kwargs or {}),
            [inputs["image_hash"] for inputs in model_inputs],
            [inputs["slice_labels"] for inputs in model_inputs],
        )
        return [
            {
                "expert": inputs["expert"],
                "intermediate_text": text,
                "intermediate_cached": was_cached,
                "image_metadata": inputs["image_metadata"],
                "routing": inputs["routing"],
                "disclaimer": DISCLAIMER,
                "warnings": row_warnings,
            }
            for inputs, text, was_cached, row_warnings in zip(model_inputs, texts, cached, warnings, strict=True)
        ]

    # ------------------------------------------------------------------ streaming

    def stream(self, inputs=None, **kwargs):
        """Answer one request with a local language model, yielding text pieces as they are generated.

        Yields ``str`` chunks of the answer, then, last, the complete record (a ``dict``, the same as
        ``__call__`` returns). Greedy streaming yields the same answer text as ``__call__``.
        """
        from threading import Event, Thread

        from transformers import StoppingCriteriaList

        if inputs is None and "question" in kwargs:
            inputs = {"question": kwargs.pop("question"), "image": kwargs.pop("image", None)}
        request = _normalise_request(inputs, self.model.config.experts)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        self._check_streamable(forward_params)
        model_inputs = self.preprocess(request, **preprocess_params)
        warnings = [list(model_inputs["warnings"])]
        expert = model_inputs["expert"]
        precomputed_text = model_inputs["precomputed_text"]
        intermediate_text, intermediate_cached = precomputed_text, False
        if precomputed_text is None:
            texts, cached = self._intermediate_texts(
                [expert],
                [model_inputs["image_features"]],
                warnings,
                forward_params.get("caption_generate_kwargs", {}),
                [model_inputs["image_hash"]],
                [model_inputs["slice_labels"]],
            )
            intermediate_text, intermediate_cached = texts[0], cached[0]
        prompt = self._build_prompts(
            [model_inputs["question"]], [intermediate_text], [model_inputs["history"]], warnings
        )[0]
        encoded, answer_kwargs = self._prepare_local_generation([prompt], forward_params.get("generate_kwargs", {}))
        streamer = _WholeAnswerStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        # Set when the consumer stops early (closes the generator, e.g. a client disconnected).
        abandoned = Event()

        def generate() -> None:
            try:
                self.model.generate_answer(
                    encoded["input_ids"],
                    encoded["attention_mask"],
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(abandoned)]),
                    **answer_kwargs,
                )
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        worker = Thread(target=generate, daemon=True)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            abandoned.set()  # no-op when generation already finished
            worker.join()
        if failure:
            raise failure[0]
        outputs = {
            "answer": "".join(pieces).strip(),
            "expert": expert,
            "image_metadata": model_inputs["image_metadata"],
            "routing": model_inputs["routing"],
            "backend": BACKEND_LOCAL,
            "intermediate_text": intermediate_text,
            "intermediate_cached": intermediate_cached,
            "prompt": prompt,
            "warnings": warnings[0],
        }
        yield self.postprocess(outputs, **postprocess_params)

    def _check_streamable(self, forward_params: dict) -> None:
        """Refuse, before any work, what a token-by-token stream of one answer cannot serve (typed, not raw)."""
        backend = forward_params.get("backend")
        if backend is not None and backend != BACKEND_LOCAL:
            raise UnknownParameterError(
                "stream() runs the bundle's own language model; for a remote backend stream with "
                "language_backends.get_backend(...).stream(prompt), or call the pipeline without streaming."
            )
        # The model's own generation defaults count too (a bundle may ship num_beams > 1).
        defaults = self.model.language_model.generation_config
        options = forward_params.get("generate_kwargs", {})
        for key, what in (("num_beams", "beam search"), ("num_return_sequences", "several answers per request")):
            value = options.get(key, getattr(defaults, key, 1))
            if isinstance(value, int) and value > 1:
                raise UnknownParameterError(
                    f"{key}={value} ({what}) cannot be streamed: a stream yields one answer token by token. "
                    f"Pass {key}=1, or call the pipeline without streaming."
                )

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory, **kwargs):
        """Save model, tokenizer, remote code and ``custom_pipelines``, plus the experts' processors.

        ``Pipeline.save_pretrained`` alone does not save multi-part processors; they go to the
        ``captioner/`` and ``chart_reader/`` subfolders that ``load_expert_processors`` reads.
        """
        super().save_pretrained(save_directory, **kwargs)
        self.model.save_expert_processors(
            save_directory, **{name: expert.processor for name, expert in self.experts.items()}
        )


class _StopWhenSet(StoppingCriteria):
    """Ends generation once ``event`` is set (the stream's consumer went away)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _WholeAnswerStreamer(TextIteratorStreamer):
    """Yields what decoding the *whole* answer so far adds, so the pieces join to exactly the answer.

    ``TextIteratorStreamer`` decodes word by word and restarts after each newline; for byte-level and
    SentencePiece tokenizers that can add or drop a space compared with decoding all ids at once (what
    ``__call__`` returns). Re-decoding the answer at each step costs little at answer lengths.
    """

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self._answer_ids: list[int] = []
        self._emitted = ""

    def _emit_new_text(self, stream_end: bool = False) -> None:
        text = self.tokenizer.decode(self._answer_ids, **self.decode_kwargs)
        # Hold back an incomplete multi-byte character until the next token completes it.
        if (stream_end or not text.endswith("\ufffd")) and text.startswith(self._emitted):
            new_text, self._emitted = text[len(self._emitted) :], text
            if new_text:
                self.on_finalized_text(new_text)

    def put(self, value) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self._answer_ids.extend(value.reshape(-1).tolist())  # one request: batch size 1
        self._emit_new_text()

    def end(self) -> None:
        self._emit_new_text(stream_end=True)
        self.on_finalized_text("", stream_end=True)


def published_default() -> tuple[str, str]:
    """``(repo id, revision)`` that ``pipeline("visual-med-alpaca", trust_remote_code=True)`` loads without ``model=``.

    ``VISUAL_MED_ALPACA_MODEL`` / ``VISUAL_MED_ALPACA_REVISION`` override it (e.g. a local bundle folder).
    """
    return (
        os.environ.get("VISUAL_MED_ALPACA_MODEL") or PUBLISHED_MODEL_ID,
        os.environ.get("VISUAL_MED_ALPACA_REVISION") or PUBLISHED_REVISION,
    )


def register_pipeline() -> None:
    """Register the task, with the published bundle as its default model.

    Then ``pipeline("visual-med-alpaca", trust_remote_code=True)`` works in this process (importing this module
    does it), and ``save_pretrained`` writes ``custom_pipelines`` into ``config.json`` (without the default:
    a bundle names only its own pipeline class). A second copy of this module (the checkout's and a bundle's
    remote-code copy) keeps the first registration instead of overwriting it with a warning.
    """
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=VisualMedAlpacaPipeline, pt_model=AutoModel, default={"model": published_default()}
        )
    VisualMedAlpacaPipeline._registered_impl = {TASK: {"impl": VisualMedAlpacaPipeline, "pt": (AutoModel,)}}


def _check_expert_name(expert, known_experts) -> str:
    if not isinstance(expert, str) or (expert not in known_experts and expert != "none"):
        raise UnknownParameterError(f"expert must be one of {', '.join(known_experts)} or 'none'.")
    return expert


def _normalise_request(request, known_experts) -> dict:
    """Validate one request; errors name the problem, never the payload."""
    if isinstance(request, str):
        request = {"question": request}
    if not isinstance(request, dict):
        raise InputError(
            f"Each input must be a dict with a 'question' (and optionally an 'image'), not {type(request).__name__}."
        )
    unknown = sorted(set(request) - INPUT_KEYS)
    if unknown:
        raise UnknownParameterError(
            # Counted, not named: an input's keys are data (a batch file's row), and data is never echoed.
            f"An input has {len(unknown)} unknown key(s). Accepted keys: {', '.join(sorted(INPUT_KEYS))}."
        )
    question = request.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MissingQuestionError("Each input needs a non-empty 'question' string.")
    expert = request.get("expert")
    if expert is not None:
        _check_expert_name(expert, known_experts)
    image = request.get("image")
    if isinstance(image, str) and not image.strip():
        raise InvalidImageError("The 'image' string is empty; pass a path, bytes, or leave 'image' out.")
    history = request.get("history")
    if history is not None:
        if not isinstance(history, (list, tuple)) or not all(
            isinstance(turn, dict)
            and set(turn) == {"question", "answer"}
            and isinstance(turn["question"], str)
            and isinstance(turn["answer"], str)
            for turn in history
        ):
            raise InputError(
                "'history' must be a list of earlier turns, oldest first, each a dict with exactly a 'question' "
                "and an 'answer' string."
            )
        history = [dict(turn) for turn in history]
    intermediate_text = request.get("intermediate_text")
    if intermediate_text is not None and not isinstance(intermediate_text, str):
        raise InputError("'intermediate_text' must be the string an earlier record returned, or left out.")
    return {
        "question": question,
        "image": image,
        "expert": expert,
        "history": history,
        "intermediate_text": intermediate_text,
    }


# Importing the project's pipeline (from a checkout, or a bundle's remote code) registers its task.
register_pipeline()

__all__ = [
    "PUBLISHED_MODEL_ID",
    "PUBLISHED_REVISION",
    "RECORD_KEYS",
    "TASK",
    "IntermediateTextCache",
    "VisualMedAlpacaPipeline",
    "image_content_hash",
    "published_default",
    "register_pipeline",
    "weights_fingerprint",
]
