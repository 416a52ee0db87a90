"""Serve a Visual Med-Alpaca bundle to many users: an OpenAI-compatible chat API on Ray Serve, with dynamic batching.

Local (an embedded single-node Ray, started in this process; Ctrl-C / SIGTERM drains requests in flight, then stops)::

    .venv/bin/python serve.py --bundle build/demo_bundle --host 127.0.0.1 --port 8000
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "demo_bundle", "messages": [{"role": "user", "content": "What is a stroke?"}]}'

On an existing Ray cluster, the same application from the shipped config (replicas, autoscaling, GPUs, batching)::

    serve deploy serve_config.yaml            # or: serve run serve_config.yaml
    serve run serve:build_app bundle=org/visual-med-alpaca revision=<commit>

Three deployments composed with handles, each scaled and placed on its own resources:

- ``ExpertStage``: the visual experts. ``@serve.batch`` groups concurrent images into one batched expert run
  (``VisualMedAlpacaPipeline.describe_images``); the pipeline's intermediate-text cache means a follow-up turn
  that re-sends the image does not run the expert again.
- ``LanguageStage``: the language model. ``@serve.batch`` groups concurrent prompts with the same generation
  settings into one left-padded batched ``generate`` (the pipeline's own batched forward, given the expert's
  text), so greedy answers equal those computed one at a time. With ``--language_backend`` the prompts go to any
  OpenAI-compatible server instead (vLLM for multi-GPU/multi-node language-model serving; language_backends.py).
- ``ChatAPI``: the FastAPI ingress (``/v1/chat/completions``, ``/v1/models``, ``/predict``, ``/health``,
  ``/stats``). ``max_ongoing_requests``/``max_queued_requests`` bound it: overload gets 503 with ``Retry-After``.

Routes: ``POST /v1/chat/completions`` (OpenAI schema, ``stream: true`` for server-sent events; the provenance record
is the extra top-level field ``visual_med_alpaca``), ``GET /v1/models``, ``POST /predict`` (the Inference Endpoints
handler's JSON contract), ``GET /health`` (200 once both stages answer), ``GET /stats`` (recent batch sizes).
Errors are OpenAI error objects (``openai_protocol.py``) and never echo the request; nothing logs a request body.
"""

import asyncio
import collections
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

import modeling_visual_med_alpaca  # noqa: E402  (the error classes the Endpoints contract raises)
from handler import (  # noqa: E402  (one definition of the Endpoints request contract)
    SHAPE_VQA,
    EndpointContract,
    EndpointLimits,
    EndpointRequestError,
    answer_score,
    each_alone_on_failure,
    endpoint_error,
)
from openai_protocol import (  # noqa: E402
    ChatTurns,
    Limits,
    ProtocolError,
    chat_chunk,
    chat_completion,
    chat_to_turns,
    completion_id,
    cut_at_stop,
    error_body,
    fetch_allowlisted_image,
    model_list,
    parse_chat_request,
    usage,
)

logger = logging.getLogger("visual_med_alpaca.serve")
APP_NAME = "visual-med-alpaca"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
ENDPOINT_DEFAULTS = EndpointLimits()  # /predict: the Endpoints handler's contract and caps (handler.py)


@dataclass
class ServeArguments:
    bundle: str = field(default="build/demo_bundle", metadata={"help": "bundle folder or Hub repo id"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (pin a commit) of a repo id"})
    model_name: str | None = field(default=None, metadata={"help": "model id in the API (default: bundle name)"})
    host: str = field(default="127.0.0.1")
    port: int = field(default=8000)
    api_key_env: str | None = field(
        default=None, metadata={"help": "environment variable holding the API key clients must send (Bearer)"}
    )
    max_batch_size: int = field(default=8, metadata={"help": "@serve.batch: most requests per batched forward"})
    batch_wait_timeout_s: float = field(default=0.02, metadata={"help": "@serve.batch: wait to fill a batch"})
    max_ongoing_requests: int = field(default=32, metadata={"help": "requests the API replica works on at once"})
    max_queued_requests: int = field(default=64, metadata={"help": "requests queued beyond that; more get 503"})
    retry_after_s: float = field(default=1.0, metadata={"help": "Retry-After of a 503 (overload)"})
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "largest request body"})
    max_image_bytes: int = field(default=ENDPOINT_DEFAULTS.max_image_bytes, metadata={"help": "largest encoded image"})
    max_images: int = field(default=1, metadata={"help": "images per conversation (the model reads one)"})
    max_question_chars: int = field(default=ENDPOINT_DEFAULTS.max_question_chars)
    max_tokens: int = field(
        default=ENDPOINT_DEFAULTS.max_new_tokens, metadata={"help": "cap of a request's max_tokens / max_new_tokens"}
    )
    max_predict_inputs: int = field(default=ENDPOINT_DEFAULTS.max_inputs, metadata={"help": "inputs per /predict"})
    allowed_image_hosts: str = field(
        default="", metadata={"help": "comma-separated host[:port] list whose http(s) image URLs are fetched"}
    )
    language_backend: str | None = field(
        default=None,
        metadata={
            "help": 'JSON of an OpenAI-compatible language backend, e.g. {"type": "openai", "base_url": '
            '"http://vllm:8000/v1", "model": "medalpaca-7b"} (default: the bundle\'s own language model)'
        },
    )
    intermediate_cache_size: int | None = field(
        default=None,
        metadata={"help": "experts' texts kept by image content (default: the bundle's; 0 turns the reuse off)"},
    )
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs of the embedded Ray (default: all)"})
    ray_temp_dir: str | None = field(default=None, metadata={"help": "Ray's session/log folder (default /tmp/ray)"})

    def limits(self) -> Limits:
        hosts = tuple(host.strip().lower() for host in self.allowed_image_hosts.split(",") if host.strip())
        return Limits(
            max_images=self.max_images,
            max_question_chars=self.max_question_chars,
            max_tokens=self.max_tokens,
            max_image_bytes=self.max_image_bytes,
            allowed_image_hosts=hosts,
        )

    def endpoint_limits(self) -> EndpointLimits:
        """/predict's caps: the handler's, with the limits these flags share (series caps are the handler's)."""
        return EndpointLimits(
            max_inputs=self.max_predict_inputs,
            max_image_bytes=self.max_image_bytes,
            max_question_chars=self.max_question_chars,
            max_new_tokens=self.max_tokens,
        )


# ---------------------------------------------------------------------------------------------------- stages


def load_pipeline(bundle: str, revision: str | None, intermediate_cache_size: int | None = None):
    """The bundle the way users load it (remote code); one torch thread per replica (Ray sets OMP_NUM_THREADS)."""
    import torch
    from transformers import pipeline

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    kwargs: dict[str, Any] = {"trust_remote_code": True}
    if revision:
        kwargs["revision"] = revision
    if intermediate_cache_size is not None:
        kwargs["intermediate_cache_size"] = intermediate_cache_size
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    return pipeline(model=bundle, **kwargs)


def failure(error: BaseException) -> dict:
    """A stage's error as data (raised errors would cross Ray with their traceback), mapped as the Endpoints handler
    maps it: typed errors keep their message (which never holds the payload) and status; anything else is an
    ``InternalError`` logged by type only."""
    mapped = endpoint_error(error)
    return {"error": {"status": mapped.http_status, "message": mapped.message, "type": mapped.error_type}}


class _BatchedStage:
    """Shared by both stages: the pipeline, one worker thread for model work, batch settings from user_config."""

    def __init__(self, bundle: str, revision: str | None, intermediate_cache_size: int | None = None):
        self.pipeline = load_pipeline(bundle, revision, intermediate_cache_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        self.active_streams = 0
        self.cancelled_streams = 0

    def reconfigure(self, config: dict) -> None:
        batched = self._batched_method()
        batched.set_max_batch_size(int(config.get("max_batch_size", 8)))
        batched.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.02)))

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {
            "batch_sizes": list(self.batch_sizes),
            "active_streams": self.active_streams,
            "cancelled_streams": self.cancelled_streams,
        }

    async def _run_batch(self, function, items: list) -> list:
        self.batch_sizes.append(len(items))
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, each_alone_on_failure, function, items, failure
        )


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class ExpertStage(_BatchedStage):
    """The visual experts: image -> intermediate text (caption / chart table), batched across requests."""

    def _batched_method(self):
        return self.describe

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def describe(self, items: list[dict]) -> list[dict]:
        """``{"image": bytes, "expert": name | None}`` -> the pipeline's describe record (or ``error``)."""
        return await self._run_batch(self._describe_now, items)

    def _describe_now(self, items: list[dict]) -> list[dict]:
        # Images arrive as bytes (the API decoded or downloaded them): the stage never reads a path or a URL.
        requests = [{"image": item["image"], "expert": item.get("expert")} for item in items]
        if not hasattr(self.pipeline, "describe_images"):  # a bundle saved before the batched hook: one by one
            return [{"routing": None, **self.pipeline.describe_image(r["image"], r["expert"])} for r in requests]
        return self.pipeline.describe_images(requests)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class LanguageStage(_BatchedStage):
    """The language model: prompt (question, expert text, history) -> answer; batched across requests that share
    generation settings. ``language_backend`` sends the prompts to an OpenAI-compatible server instead."""

    def __init__(
        self,
        bundle: str,
        revision: str | None,
        intermediate_cache_size: int | None = None,
        language_backend: dict | None = None,
    ):
        super().__init__(bundle, revision, intermediate_cache_size)
        self.backend = language_backend
        self.default_max_new_tokens = int(self.pipeline.model.config.answer_max_new_tokens)

    def _batched_method(self):
        return self.answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def answer(self, items: list[dict]) -> list[dict]:
        """Batched: ``{"request", "generation", "seed", "stop", "return_prompt"}`` ->
        ``{"record", "usage", "finish_reason"}`` (or ``{"error"}``)."""
        return await self._run_batch(self._answer_now, items)

    def _answer_now(self, items: list[dict]) -> list[dict]:
        import torch

        results: list[dict | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            # Seeded sampling runs alone (a batch-mate would change its random stream); the rest groups by settings.
            key = json.dumps(item["generation"], sort_keys=True) + (f"#{index}" if item.get("seed") is not None else "")
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            first = items[indices[0]]
            if first.get("seed") is not None:
                torch.manual_seed(first["seed"])
            requests = [items[i]["request"] for i in indices]
            records = self.pipeline(
                requests, batch_size=len(requests), return_prompt=True, **self._generate_kwargs(first["generation"])
            )
            for i, record in zip(indices, records, strict=True):
                results[i] = self._finish(items[i], record)
        return results

    def _generate_kwargs(self, generation: dict) -> dict:
        kwargs = {"max_new_tokens": self.default_max_new_tokens, **generation}
        if self.backend is not None:
            kwargs["backend"] = self.backend
        return kwargs

    def _finish(self, item: dict, record: dict) -> dict:
        """Stop sequences, usage and finish_reason for one answer record (and the answer's score on request: the
        visual-question-answering shape of /predict)."""
        answer, cut = cut_at_stop(record["answer"], item.get("stop") or [])
        record = dict(record, answer=answer)
        score = answer_score(self.pipeline, record) if item.get("score") else None
        prompt = record["prompt"] if item.get("return_prompt") else record.pop("prompt")
        tokenizer = self.pipeline.tokenizer
        prompt_tokens = len(tokenizer(prompt)["input_ids"])
        limit = item["generation"].get("max_new_tokens", self.default_max_new_tokens)
        # The answer re-tokenised (the pipeline returns text); never more than were generated.
        completion_tokens = min(limit, len(tokenizer(record["answer"], add_special_tokens=False)["input_ids"]))
        finish_reason = "length" if not cut and completion_tokens >= limit else "stop"
        result = {"record": record, "usage": usage(prompt_tokens, completion_tokens), "finish_reason": finish_reason}
        if item.get("score"):
            result["score"] = score
        return result

    async def stream(self, item: dict):
        """Yields answer pieces (``str``) as they are generated, then ``{"record", "usage", "finish_reason"}``.

        One request per stream (not batched). If the caller goes away (a client disconnected), Ray cancels this
        generator and closing the pipeline's stream stops generation at the next token, freeing the slot.
        """
        if self.backend is not None:  # a remote server's answer arrives whole: one piece
            result = (await self._run_batch(self._answer_now, [item]))[0]
            if "error" not in result:
                yield result["record"]["answer"]
            yield result
            return
        loop = asyncio.get_running_loop()
        # Its own thread: next() and close() of one generator must not overlap, and batches keep running.
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream")
        done = object()
        stops = item.get("stop") or []
        hold = max((len(stop) for stop in stops), default=1) - 1  # text that may still become a stop sequence
        pieces = None
        self.active_streams += 1
        try:
            if item.get("seed") is not None:
                import torch

                torch.manual_seed(item["seed"])
            pieces = self.pipeline.stream(
                item["request"], return_prompt=True, **self._generate_kwargs(item["generation"])
            )
            text, sent, stopped, record = "", 0, False, None
            while record is None:
                piece = await loop.run_in_executor(worker, next, pieces, done)
                if piece is done:
                    raise RuntimeError("The answer stream ended without its record.")
                if isinstance(piece, dict):
                    record = piece
                    break
                if stopped:  # past a stop sequence: nothing more is sent; the record still comes last
                    continue
                text += piece
                # Sent text is always a prefix of the final answer (stripped, cut at a stop sequence): leading
                # whitespace is dropped, trailing whitespace and what may still become a stop sequence wait.
                visible = text.lstrip()
                head, stopped = cut_at_stop(visible, stops)
                safe = len(head) if stopped else max(sent, min(len(visible) - hold, len(visible.rstrip())))
                if safe > sent:
                    yield visible[sent:safe]
                    sent = safe
            final_answer, _ = cut_at_stop(record["answer"], stops)
            if len(final_answer) > sent:
                yield final_answer[sent:]
            yield self._finish(item, record)
        except asyncio.CancelledError:  # the caller went away (Ray cancels the request)
            self.cancelled_streams += 1
            raise
        except Exception as error:
            yield failure(error)
        finally:
            # Also on cancellation: closing the pipeline's stream (after any next() in flight, same thread) sets
            # its stop flag, so generation ends at the next token.
            if pieces is not None:
                worker.submit(pieces.close)
            worker.shutdown(wait=False)
            self.active_streams -= 1


# ---------------------------------------------------------------------------------------------------- API

api = FastAPI(title="Visual Med-Alpaca", docs_url=None, redoc_url=None, openapi_url=None)


class StageError(Exception):
    def __init__(self, error: dict):
        super().__init__(error["message"])
        self.error = error


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, max_queued_requests=64)
@serve.ingress(api)
class ChatAPI:
    def __init__(self, experts, language, settings: dict):
        self.experts = experts
        self.language = language
        self.settings = ServeArguments(**settings)
        self.limits = self.settings.limits()
        self.endpoint_contract = EndpointContract(modeling_visual_med_alpaca, self.settings.endpoint_limits())
        self.model_id = self.settings.model_name or Path(self.settings.bundle.rstrip("/")).name
        self.created = int(time.time())
        self.api_key = os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        if self.settings.api_key_env and not self.api_key:
            raise RuntimeError(f"--api_key_env names {self.settings.api_key_env}, which is not set or empty.")

    # -------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(
                asyncio.gather(self.experts.ready.remote(), self.language.ready.remote()), timeout=10
            )
        except Exception:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self._guarded(request, self._models)

    @api.get("/stats")
    async def stats(self, request: Request):
        return await self._guarded(request, self._stats)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._guarded(request, self._chat)

    @api.post("/predict")
    async def predict(self, request: Request):
        return await self._guarded(request, self._predict)

    # -------------------------------------------------------------- plumbing

    async def _guarded(self, request: Request, handler):
        """Auth, body limit, and every error as OpenAI's error object (never the payload, never a traceback)."""
        try:
            self._authorise(request)
            return await handler(request)
        except ProtocolError as error:
            return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status)
        except StageError as error:
            status = int(error.error["status"])
            return JSONResponse(error_body(status, error.error["message"], code=error.error["type"]), status)
        except BackPressureError:
            return self._overloaded()
        except Exception as error:
            logger.error("Unexpected %s in the API.", type(error).__name__)
            return JSONResponse(error_body(500, "Internal error; the request was not processed."), 500)

    def _overloaded(self) -> JSONResponse:
        return JSONResponse(
            error_body(503, "The server is overloaded; retry later.", code="overloaded"),
            503,
            headers={"Retry-After": str(max(1, math.ceil(self.settings.retry_after_s)))},
        )

    def _authorise(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ProtocolError(
                401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key"
            )

    async def _json_body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise ProtocolError(413, f"The request body is larger than {self.settings.max_body_bytes} bytes.")
        body = await request.body()
        if len(body) > self.settings.max_body_bytes:
            raise ProtocolError(413, f"The request body is larger than {self.settings.max_body_bytes} bytes.")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(400, "The request body is not valid JSON.") from None

    async def _models(self, request: Request):
        return model_list(self.model_id, self.created)

    async def _stats(self, request: Request):
        expert_stats, language_stats = await asyncio.gather(self.experts.stats.remote(), self.language.stats.remote())
        return {
            "expert_batch_sizes": expert_stats["batch_sizes"],
            "language_batch_sizes": language_stats["batch_sizes"],
            "active_streams": language_stats["active_streams"],
            "cancelled_streams": language_stats["cancelled_streams"],
        }

    async def _describe(self, image, expert: str | None) -> dict | None:
        if image is None:
            return None
        if isinstance(image, str):  # an allowlisted URL (chat_to_turns checked the host)
            image = await fetch_allowlisted_image(image, self.limits)
        described = await self.experts.describe.remote({"image": image, "expert": expert})
        if "error" in described:
            raise StageError(described["error"])
        return described

    @staticmethod
    def _language_request(question: str, history: list, described: dict | None, expert: str | None) -> dict:
        request = {"question": question, "history": history or None}
        if described is not None:
            request.update(intermediate_text=described["intermediate_text"], expert=described["expert"])
        elif expert is not None:
            request["expert"] = expert
        return request

    @staticmethod
    def _record(described: dict | None, answered: dict, warnings: list[str]) -> dict:
        """The pipeline's record contract for the whole chain: expert-stage provenance + language-stage answer."""
        record = dict(answered)
        if described is not None:
            for key in ("expert", "intermediate_text", "intermediate_cached", "image_metadata", "routing"):
                record[key] = described[key]
        record["warnings"] = [*warnings, *(described["warnings"] if described else []), *answered["warnings"]]
        return record

    def _generation(self, chat) -> dict:
        max_tokens = chat.max_completion_tokens or chat.max_tokens
        generation: dict[str, Any] = {}
        if max_tokens is not None:
            if max_tokens > self.limits.max_tokens:
                raise ProtocolError(400, f"max_tokens must be at most {self.limits.max_tokens}.", param="max_tokens")
            generation["max_new_tokens"] = max_tokens
        if chat.temperature:  # None or 0: greedy (the bundle's default)
            generation.update(do_sample=True, temperature=chat.temperature)
            if chat.top_p is not None:
                generation["top_p"] = chat.top_p
        return generation

    @staticmethod
    def _stops(chat) -> list[str]:
        stops = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise ProtocolError(400, f"stop takes 1 to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
        return stops

    # -------------------------------------------------------------- chat completions

    async def _chat(self, request: Request):
        chat = parse_chat_request(await self._json_body(request))
        if chat.model is not None and chat.model != self.model_id:
            raise ProtocolError(
                404, "The model does not exist on this server; see /v1/models.", "model", "model_not_found"
            )
        generation = self._generation(chat)
        stops = self._stops(chat)
        turns: ChatTurns = chat_to_turns(chat, self.limits)
        described = await self._describe(turns.image, chat.expert)
        item = {
            "request": self._language_request(turns.question, turns.history, described, chat.expert),
            "generation": generation,
            "seed": chat.seed,
            "stop": stops,
        }
        request_id = completion_id()
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                self._sse(request_id, item, described, turns.warnings, include_usage),
                media_type="text/event-stream",
            )
        answered = await self.language.answer.remote(item)
        if "error" in answered:
            raise StageError(answered["error"])
        record = self._record(described, answered["record"], turns.warnings)
        return chat_completion(
            request_id, self.model_id, record["answer"], answered["finish_reason"], answered["usage"], record
        )

    async def _sse(self, request_id: str, item: dict, described: dict | None, warnings: list, include_usage: bool):
        """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk (the record rides on the last
        chunk sent), an optional usage chunk, then ``data: [DONE]``."""
        created = int(time.time())

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        yield event(chat_chunk(request_id, self.model_id, created, {"role": "assistant", "content": ""}))
        try:
            final = None
            async for piece in self.language.options(stream=True).stream.remote(item):
                if isinstance(piece, str):
                    yield event(chat_chunk(request_id, self.model_id, created, {"content": piece}))
                else:
                    final = piece
            if final is None or "error" in final:
                error = (final or {}).get("error") or {"status": 500, "message": "The stream ended without an answer."}
                yield event(error_body(int(error["status"]), error["message"], code=error.get("type")))
            else:
                record = self._record(described, final["record"], warnings)
                finish = chat_chunk(request_id, self.model_id, created, {}, final["finish_reason"])
                if include_usage:
                    yield event(finish)
                    last = chat_chunk(request_id, self.model_id, created, None)
                    last["usage"] = final["usage"]
                else:
                    last = finish
                last["visual_med_alpaca"] = record
                yield event(last)
        except Exception as error:
            logger.error("Stream failed with %s.", type(error).__name__)
            yield event(error_body(500, "Internal error while streaming the answer."))
        yield "data: [DONE]\n\n"

    # -------------------------------------------------------------- /predict (Endpoints handler contract)

    async def _predict(self, request: Request):
        """The Endpoints handler's contract (handler.EndpointContract: shapes, items, caps, parameters, error
        mapping, bad items of a batch marked in place) with the answers from the two stages. Refusals are the
        contract's error record ``{"error", "error_type", "status"}`` with ``status`` as the HTTP status."""
        try:
            try:
                body = await self._json_body(request)
            except ProtocolError as error:  # the body cannot be read: the same types endpoint_server.py gives
                error_type = "PayloadTooLargeError" if error.status == 413 else "InputError"
                raise EndpointRequestError(error_type, error.message, error.status) from None
            parsed = await asyncio.to_thread(self.endpoint_contract.parse, body)  # base64 decoding: off the loop
            parameters = dict(parsed.parameters)
            expert = parameters.pop("expert", None)
            return_prompt = bool(parameters.pop("return_prompt", False))
            scored = parsed.shape == SHAPE_VQA
            scores: dict[int, float | None] = {}

            async def answer(index: int, item: dict | EndpointRequestError) -> dict | EndpointRequestError:
                if isinstance(item, EndpointRequestError):
                    return item
                chosen = item.get("expert") or expert
                try:
                    described = await self._describe(item.get("image"), chosen)
                    answered = await self.language.answer.remote(
                        {
                            "request": self._language_request(item["question"], [], described, chosen),
                            "generation": parameters,
                            "seed": None,
                            "stop": [],
                            "return_prompt": return_prompt,
                            "score": scored,
                        }
                    )
                    if "error" in answered:
                        raise StageError(answered["error"])
                except StageError as error:
                    return EndpointRequestError(error.error["type"], error.error["message"], int(error.error["status"]))
                scores[index] = answered.get("score")
                return self._record(described, answered["record"], [])

            outcomes = await asyncio.gather(*(answer(index, item) for index, item in enumerate(parsed.items)))
            return self.endpoint_contract.respond(parsed, list(outcomes), lambda _record: scores.get(0))
        except BackPressureError:
            raise
        except Exception as error:
            refused = self.endpoint_contract.error(error)
            return JSONResponse(refused.as_record(), refused.http_status)


# ---------------------------------------------------------------------------------------------------- application


def build_application(args: ServeArguments):
    """The three deployments, composed with handles; options from the flags (a config file's override them)."""
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    stage_ongoing = max(16, 2 * args.max_batch_size)
    backend = json.loads(args.language_backend) if args.language_backend else None
    if backend is not None:
        from language_backends import parse_backend

        parse_backend(backend)  # refuse a bad backend at start, not on the first request
    experts = ExpertStage.options(user_config=batching, max_ongoing_requests=stage_ongoing).bind(
        args.bundle, args.revision, args.intermediate_cache_size
    )
    language = LanguageStage.options(user_config=batching, max_ongoing_requests=stage_ongoing).bind(
        args.bundle, args.revision, args.intermediate_cache_size, backend
    )
    from ray.serve.config import BackpressureConfig

    return ChatAPI.options(
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
    ).bind(experts, language, asdict(args))


def build_app(args: dict):
    """Application builder for ``serve run serve:build_app key=value ...`` and ``serve_config.yaml``'s ``args``."""
    from transformers import HfArgumentParser

    known = {f.name for f in fields(ServeArguments)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"Unknown serve argument(s): {', '.join(unknown)}.")
    argv = [token for name, value in args.items() if value is not None for token in (f"--{name}", str(value))]
    (parsed,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses(args=argv)
    return build_application(parsed)


def start_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """An embedded single-node Ray whose workers can import this checkout (serve.py and its modules)."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=num_cpus or max(2, os.cpu_count() or 1),  # one per model stage at least (logical CPUs)
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},
    )


def deploy(args: ServeArguments) -> None:
    """Start Serve's HTTP proxy on host:port and deploy (returns once every replica is ready)."""
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(args), name=APP_NAME, route_prefix="/")


def main(args: ServeArguments) -> int:
    """Start an embedded Ray, deploy, answer until SIGINT/SIGTERM, then drain requests in flight and stop."""
    import ray

    start_ray(args.num_cpus, args.ray_temp_dir)
    # Right after ray.init: before it, Ray's own handler dumps a stack, exits 15 and leaves workers behind.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(args)
        print(f"Serving {args.bundle} at http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
        print("Stopping: finishing the requests in flight...", flush=True)
        # delete first (replicas finish what they hold), then shutdown; shutdown alone breaks requests in flight.
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO)
    (arguments,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses()
    sys.exit(main(arguments))
