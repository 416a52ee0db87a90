"""Language-model backends: who answers the Alpaca prompt.

Remote code: imported relatively by ``pipeline_vqa.py`` and copied into the published bundle with it.

- ``"local"`` (the default): the bundle's own merged Med-Alpaca, run by the pipeline in process.
- ``{"type": "openai", ...}``: any OpenAI-compatible server — vLLM, TGI, ``transformers serve``, or a
  hosted model such as GPT-3.5-Turbo (the original system's alternative language model).

    >>> vqa(request, backend={
    ...     "type": "openai",
    ...     "base_url": "http://127.0.0.1:8000/v1",
    ...     "model": "med-alpaca",
    ...     "api_key_env": "OPENAI_API_KEY",   # the *name* of the variable; the key is never stored or logged
    ... })
    >>> record["backend"]
    'openai:med-alpaca'

The same Alpaca prompt reaches either backend. ``api="completions"`` (the default) sends it verbatim to
``/v1/completions``. ``api="chat"``, for servers that offer chat only, sends it as the one user message to
``/v1/chat/completions``: a hosted chat model then reads the Alpaca prompt as its instruction (as
GPT-3.5-Turbo did in the original system), and a served Med-Alpaca answers exactly as locally when its
chat template passes a complete Alpaca prompt through verbatim, as the bundle's template does.

Why the official ``openai`` client (pinned in ``requirements.txt``) rather than plain HTTP: it is the
reference implementation of the protocol these servers copy, and it already brings timeouts, bounded
retries with exponential backoff and jitter on 408/409/429/5xx and connection errors (honouring
``Retry-After``), and server-sent-event streaming — the parts that are easy to get subtly wrong by hand.
It is imported only when a remote backend is used, inside a ``try`` block, so Hub users who answer
locally need not install it. What the client does not do is done here: check that a 200 response is
a usable completion (it returns non-JSON bodies as plain strings and unvalidated objects), and turn
every failure into a typed error that names the server and the status — never the prompt, the
server's response body or the API key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

try:
    from .modeling_visual_med_alpaca import (
        BackendError,
        BackendTimeoutError,
        BackendUnavailableError,
        UnknownParameterError,
    )
except ImportError:  # imported from a checkout as a top-level module
    from modeling_visual_med_alpaca import (
        BackendError,
        BackendTimeoutError,
        BackendUnavailableError,
        UnknownParameterError,
    )

BACKEND_LOCAL = "local"
BACKEND_TYPE_OPENAI = "openai"
APIS = ("completions", "chat")
OPENAI_REQUIREMENT = "openai==3.57.0"
# Sent as the bearer token when no api_key_env is configured (local vLLM/TGI/transformers serve need none).
_NO_API_KEY = "no-key"
_SETTINGS = ("type", "base_url", "model", "api_key_env", "api", "timeout", "max_retries", "max_concurrency")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# GenerationConfig keywords that have an OpenAI-protocol equivalent; anything else is refused, not dropped.
SUPPORTED_GENERATION_KEYS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_p", "stop_strings"})


@dataclasses.dataclass(frozen=True)
class OpenAICompatibleBackendConfig:
    """Where and how to reach an OpenAI-compatible server. Holds no secret: only the key's variable name.

    Args:
        base_url: the API root, usually ending in ``/v1`` (``http://127.0.0.1:8000/v1``).
        model: the model name the server expects.
        api_key_env: name of the environment variable that holds the API key, read at each request;
            ``None`` for servers without authentication.
        api: ``"completions"`` (the prompt verbatim) or ``"chat"`` (the prompt as the one user message).
        timeout: seconds to wait for one attempt.
        max_retries: extra attempts after a connection error, a timeout, or HTTP 408/409/429/5xx.
        max_concurrency: how many prompts of a batch are in flight at once (serving engines batch them).
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    api: str = "completions"
    timeout: float = 60.0
    max_retries: int = 2
    max_concurrency: int = 4

    @property
    def name(self) -> str:
        """What the answer record's ``backend`` field says."""
        return f"{BACKEND_TYPE_OPENAI}:{self.model}"

    @property
    def server(self) -> str:
        """Scheme, host and port only: never credentials or query strings that a URL may carry."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


@dataclasses.dataclass(frozen=True)
class RemoteCompletion:
    """One answer from a server, with the token counts it reported (``None`` when it reported none)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None


def parse_backend(value) -> OpenAICompatibleBackendConfig | None:
    """Validate a backend choice; ``None`` means the bundle's local language model.

    Accepts ``None``, ``"local"``, an ``OpenAICompatibleBackendConfig``, or a dict with ``type="openai"``.
    Errors name the offending setting, never its value (a URL or variable may be sensitive).
    """
    if value is None or value == BACKEND_LOCAL:
        return None
    if isinstance(value, OpenAICompatibleBackendConfig):
        return value
    if not isinstance(value, dict):
        raise UnknownParameterError(
            "backend must be 'local' or a dict such as {'type': 'openai', 'base_url': 'http://host:8000/v1', "
            "'model': 'NAME', 'api_key_env': 'OPENAI_API_KEY'}."
        )
    settings = dict(value)
    if "api_key" in settings:
        raise UnknownParameterError(
            "backend settings must not hold the API key itself: put it in an environment variable and pass that "
            "variable's name as 'api_key_env'."
        )
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise UnknownParameterError(
            f"Unknown backend setting(s): {', '.join(unknown)}. Accepted: {', '.join(_SETTINGS)}."
        )
    if settings.pop("type", None) != BACKEND_TYPE_OPENAI:
        raise UnknownParameterError("backend['type'] must be 'openai' (any OpenAI-compatible server), or use 'local'.")
    base_url = settings.get("base_url")
    if (
        not isinstance(base_url, str)
        or urlsplit(base_url).scheme not in ("http", "https")
        or not urlsplit(base_url).hostname
    ):
        raise UnknownParameterError("backend['base_url'] must be an http(s) URL such as 'http://127.0.0.1:8000/v1'.")
    if not isinstance(settings.get("model"), str) or not settings["model"].strip():
        raise UnknownParameterError("backend['model'] must name the model the server serves.")
    api_key_env = settings.get("api_key_env")
    if api_key_env is not None and (not isinstance(api_key_env, str) or not _ENV_NAME.match(api_key_env)):
        raise UnknownParameterError(
            "backend['api_key_env'] must be the name of an environment variable (letters, digits, underscores)."
        )
    if settings.get("api", "completions") not in APIS:
        raise UnknownParameterError(f"backend['api'] must be one of {', '.join(APIS)}.")
    timeout = settings.get("timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise UnknownParameterError("backend['timeout'] must be a positive number of seconds.")
    retries = settings.get("max_retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise UnknownParameterError("backend['max_retries'] must be an integer from 0 to 10.")
    concurrency = settings.get("max_concurrency", 4)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 64:
        raise UnknownParameterError("backend['max_concurrency'] must be an integer from 1 to 64.")
    settings["timeout"] = float(timeout)
    return OpenAICompatibleBackendConfig(**settings)


def backend_name(config: OpenAICompatibleBackendConfig | None) -> str:
    return BACKEND_LOCAL if config is None else config.name


def request_options(generate_kwargs: dict, default_max_new_tokens: int) -> dict:
    """Map GenerationConfig keywords to OpenAI request fields; refuse the ones a server cannot honour.

    Greedy unless ``do_sample=True`` — the same rule as ``generate``, so an unchanged call gives the
    local model's greedy answer on a server too.
    """
    unsupported = sorted(set(generate_kwargs) - SUPPORTED_GENERATION_KEYS)
    if unsupported:
        raise UnknownParameterError(
            f"Generation parameter(s) {', '.join(unsupported)} cannot be sent to an OpenAI-compatible backend. "
            f"Supported there: {', '.join(sorted(SUPPORTED_GENERATION_KEYS))}; use backend='local' for the others."
        )
    options: dict = {"max_tokens": int(generate_kwargs.get("max_new_tokens") or default_max_new_tokens)}
    if generate_kwargs.get("do_sample"):
        options["temperature"] = float(generate_kwargs.get("temperature", 1.0))
        if generate_kwargs.get("top_p") is not None:
            options["top_p"] = float(generate_kwargs["top_p"])
    else:
        options["temperature"] = 0.0
    stop = generate_kwargs.get("stop_strings")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return options


class OpenAICompatibleBackend:
    """Answers Alpaca prompts through an OpenAI-compatible server (completions, or chat as a fallback)."""

    def __init__(self, config: OpenAICompatibleBackendConfig):
        self.config = config
        try:
            import openai
        except ImportError:
            raise BackendUnavailableError(
                f"The OpenAI-compatible backend needs the 'openai' package: pip install {OPENAI_REQUIREMENT}."
            ) from None
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=config.base_url, api_key=_NO_API_KEY, timeout=config.timeout, max_retries=config.max_retries
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend(server={self.config.server!r}, model={self.config.model!r})"

    # ------------------------------------------------------------------ public

    def complete(self, prompts: list[str], generate_kwargs: dict | None = None, default_max_new_tokens=128):
        """The answer to each prompt, stripped like the local model's, in input order.

        One request per prompt (not every server takes a list), up to ``max_concurrency`` in flight at once.
        """
        options = request_options(generate_kwargs or {}, default_max_new_tokens)
        workers = min(len(prompts), self.config.max_concurrency)
        if workers <= 1:
            return [self.complete_one(prompt, options).text.strip() for prompt in prompts]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="language-backend") as executor:
            completions = list(executor.map(lambda prompt: self.complete_one(prompt, options), prompts))
        return [completion.text.strip() for completion in completions]

    def complete_one(self, prompt: str, options: dict) -> RemoteCompletion:
        """One request; ``options`` come from ``request_options``."""
        with self._typed_errors():
            client = self._client_with_key()
            if self.config.api == "chat":
                response = client.chat.completions.create(
                    model=self.config.model, messages=self._messages(prompt), **options
                )
            else:
                response = client.completions.create(model=self.config.model, prompt=prompt, **options)
            choice = self._first_choice(response)
            text = choice.message.content if self.config.api == "chat" else choice.text
            if not isinstance(text, str):
                raise self._garbage()
            usage = getattr(response, "usage", None)
            return RemoteCompletion(
                text=text,
                prompt_tokens=getattr(usage, "prompt_tokens", None),
                completion_tokens=getattr(usage, "completion_tokens", None),
                finish_reason=getattr(choice, "finish_reason", None),
            )

    def stream(self, prompt: str, generate_kwargs: dict | None = None, default_max_new_tokens=128) -> Iterator[str]:
        """Yield the answer's text as the server produces it; ``"".join(...).strip()`` equals ``complete``.

        Settings and the key are checked now; the request is sent when the first piece is asked for.
        """
        options = request_options(generate_kwargs or {}, default_max_new_tokens)
        return self._stream(prompt, options, self._client_with_key())

    def _stream(self, prompt: str, options: dict, client) -> Iterator[str]:
        with self._typed_errors():
            if self.config.api == "chat":
                chunks = client.chat.completions.create(
                    model=self.config.model, messages=self._messages(prompt), stream=True, **options
                )
            else:
                chunks = client.completions.create(model=self.config.model, prompt=prompt, stream=True, **options)
            if isinstance(chunks, (str, bytes)) or not hasattr(chunks, "__iter__"):
                raise self._garbage()
            with chunks:
                for chunk in chunks:
                    choices = getattr(chunk, "choices", None)
                    if not isinstance(choices, list):
                        raise self._garbage()
                    if not choices:  # e.g. a final usage-only chunk
                        continue
                    if self.config.api == "chat":
                        delta = getattr(choices[0], "delta", None)
                        text = getattr(delta, "content", None) if delta is not None else None
                    else:
                        text = getattr(choices[0], "text", None)
                    if text is not None and not isinstance(text, str):
                        raise self._garbage()
                    if text:
                        yield text

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _messages(prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    def _client_with_key(self):
        if self.config.api_key_env is None:
            return self._client
        api_key = os.environ.get(self.config.api_key_env, "").strip()
        if not api_key:
            raise BackendError(
                f"The environment variable {self.config.api_key_env} that should hold the API key for "
                f"{self.config.server} is not set or is empty. Set it before calling the pipeline."
            )
        return self._client.with_options(api_key=api_key)

    def _first_choice(self, response):
        choices = getattr(response, "choices", None)
        if isinstance(response, (str, bytes)) or not isinstance(choices, list) or not choices:
            raise self._garbage()
        return choices[0]

    def _garbage(self) -> BackendError:
        return BackendError(
            f"The language-model server at {self.config.server} answered with something that is not a "
            f"{self.config.api} response (unreadable JSON or missing fields). Check that base_url points to an "
            "OpenAI-compatible API (usually ending in /v1) and that the server offers this api."
        )

    @contextmanager
    def _typed_errors(self):
        """Translate the client's and the transport's exceptions; ``from None`` drops bodies they may carry."""
        openai = self._openai
        server, attempts = self.config.server, self.config.max_retries + 1
        try:
            yield
        except BackendError:
            raise
        except openai.APITimeoutError:
            raise BackendTimeoutError(
                f"The language-model server at {server} did not answer within {self.config.timeout:g} s "
                f"({attempts} attempt(s)). Raise backend['timeout'] or check the server's load."
            ) from None
        except openai.APIConnectionError:
            raise BackendUnavailableError(
                f"Could not connect to the language-model server at {server} ({attempts} attempt(s)). "
                "Check that it is running and that backend['base_url'] is right."
            ) from None
        except openai.APIStatusError as error:
            raise self._status_error(error.status_code, attempts) from None
        except (openai.APIError, ValueError, TypeError, AttributeError):
            # APIError without a status: an error event inside a stream; ValueError: unreadable JSON.
            raise self._garbage() from None
        except Exception as error:  # the transport failing mid-stream (httpx read errors)
            if "timeout" in type(error).__name__.lower():
                raise BackendTimeoutError(
                    f"The language-model server at {server} stopped sending within {self.config.timeout:g} s."
                ) from None
            raise BackendUnavailableError(
                f"The connection to the language-model server at {server} failed ({type(error).__name__})."
            ) from None

    def _status_error(self, status: int, attempts: int) -> BackendError:
        server = self.config.server
        if status == 429 or status >= 500:
            return BackendUnavailableError(
                f"The language-model server at {server} answered HTTP {status} to all {attempts} attempt(s) "
                "(overloaded or failing). Try again later or raise backend['max_retries']."
            )
        if status in (401, 403):
            where = f"the key in {self.config.api_key_env}" if self.config.api_key_env else "no API key"
            return BackendError(
                f"The language-model server at {server} refused {where} (HTTP {status}). "
                "Set backend['api_key_env'] to the variable that holds a valid key."
            )
        if status == 404:
            return BackendError(
                f"The language-model server at {server} has no such endpoint or model (HTTP 404). Check "
                f"backend['base_url'] (usually ending in /v1), backend['model'], and backend['api'] "
                "('completions', or 'chat' for chat-only servers)."
            )
        return BackendError(
            f"The language-model server at {server} refused the request (HTTP {status}). The prompt may be too "
            "long for it, or a generation parameter is out of its range."
        )


@functools.lru_cache(maxsize=16)
def get_backend(config: OpenAICompatibleBackendConfig) -> OpenAICompatibleBackend:
    """One client (and connection pool) per backend configuration; the key is read at each request."""
    return OpenAICompatibleBackend(config)


__all__ = [
    "APIS",
    "BACKEND_LOCAL",
    "BACKEND_TYPE_OPENAI",
    "SUPPORTED_GENERATION_KEYS",
    "OpenAICompatibleBackend",
    "OpenAICompatibleBackendConfig",
    "RemoteCompletion",
    "backend_name",
    "get_backend",
    "parse_backend",
    "request_options",
]
