"""Hugging Face Hub load failures explained: what happened, why, and what to do — one place for every tool.

``transformers`` wraps each Hub failure in an ``OSError`` whose text is generic ("We couldn't connect ...",
"... is not a valid model identifier ..."); the real cause is further down the exception chain
(``__cause__``/``__context__``): a ``huggingface_hub`` error (``GatedRepoError``, ``RevisionNotFoundError``,
``RepositoryNotFoundError`` with HTTP 401/404, ``OfflineModeIsEnabled``, ``LocalEntryNotFoundError``) or a
connection error. :func:`load_failure_message` walks that chain and names the cause in one line; the CLI,
``app.py`` and ``evaluate_vqa.py`` all report load failures through it (exit code 3).

:func:`is_retryable` tells a retry loop (pushes, downloads) which failures another attempt cannot fix:
offline mode, HTTP 401/403/404 (no such repository/revision/file, gated, private), invalid ids.

Not remote code: bundles never import this module. It imports only ``huggingface_hub``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Statuses where the same request cannot succeed later: unauthenticated, forbidden, not found.
PERMANENT_HTTP_STATUSES = frozenset({401, 403, 404})


class HubLoadError(Exception):
    """The model could not be loaded from the Hub or a folder; the message names the cause.

    Same contract as the remote code's ``ModelLoadError`` (CLI exit code 3, HTTP 503), without importing it:
    the installed command line has no copy of the remote code.
    """

    exit_code = 3
    http_status = 503


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it was raised from or during (``__cause__``, then ``__context__``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _first(chain: list[BaseException], kind) -> BaseException | None:
    return next((error for error in chain if isinstance(error, kind)), None)


def _root_cause(chain: list[BaseException]) -> str:
    """The innermost error as ``Type: first line`` (a connection error's reason, e.g. connection refused)."""
    innermost = chain[-1]
    text = str(innermost).strip().splitlines()[0][:160].rstrip(".") if str(innermost).strip() else ""
    return f"{type(innermost).__name__}: {text}" if text else type(innermost).__name__


def _is_connection_failure(error: BaseException) -> bool:
    # httpx/httpcore connection and timeout errors are not ConnectionError subclasses: match them by name.
    name = type(error).__name__
    return isinstance(error, (ConnectionError, TimeoutError)) or name in {
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "TimeoutException",
        "NetworkError",
        "ProxyError",
        "RemoteProtocolError",
    }


def offline_mode() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE or hub_constants.is_offline_mode())


def explain_hub_error(error: BaseException, model: str, revision: str | None = None) -> str | None:
    """The cause of a Hub load failure and what to do, in one sentence; ``None`` when the Hub is not involved."""
    chain = list(exception_chain(error))
    where = f"'{model}'" + (f" at revision '{revision}'" if revision else "")
    not_a_folder = "" if Path(model).exists() else f" (there is no local folder '{model}' either)"

    if _first(chain, OfflineModeIsEnabled) is not None or (
        offline_mode() and _first(chain, LocalEntryNotFoundError) is not None
    ):
        return (
            f"offline mode (HF_HUB_OFFLINE=1) is on and {where} is not in the local Hub cache{not_a_folder}. "
            "Unset HF_HUB_OFFLINE to download it, or pass --model a bundle folder (make demo builds build/demo_bundle)."
        )
    gated = _first(chain, GatedRepoError)
    if gated is not None:
        return (
            f"{where} is a gated repository and this login has no access (HTTP {_status(gated) or 403}). "
            f"Request access on https://huggingface.co/{model}, then log in (hf auth login) or set HF_TOKEN."
        )
    missing_revision = _first(chain, RevisionNotFoundError)
    if missing_revision is not None:
        return (
            f"the repository '{model}' has no revision '{revision or 'main'}' (HTTP {_status(missing_revision)}). "
            "Pass --revision an existing branch, tag or full commit sha."
        )
    missing_repo = _first(chain, RepositoryNotFoundError)
    if missing_repo is not None:
        status = _status(missing_repo)
        return (
            f"the Hub has no repository '{model}' that this login can read (HTTP {status}): the id is wrong, or the "
            f"repository is private and no token with access was given{not_a_folder}. Check the id; for a private "
            "repository log in (hf auth login) or set HF_TOKEN."
        )
    http_error = _first(chain, HfHubHTTPError)
    status = _status(http_error) if http_error is not None else None
    if status in (401, 403):
        return (
            f"the Hub refused access to {where} (HTTP {status}): the token is missing, expired or lacks read "
            "permission. Log in (hf auth login) or set HF_TOKEN to a token that can read it."
        )
    missing_file = _first(chain, EntryNotFoundError)
    if missing_file is not None and not isinstance(missing_file, LocalEntryNotFoundError):
        return (
            f"{where} lacks a file the bundle needs (HTTP {_status(missing_file) or 404}): it is not a complete "
            "Visual Med-Alpaca bundle. Publish it with publish_bundle.py, or pick the revision that has it."
        )
    connection = next((e for e in chain if _is_connection_failure(e)), None)
    if connection is not None or (_first(chain, LocalEntryNotFoundError) is not None and status is None):
        return (
            f"the Hub ({hub_constants.ENDPOINT}) could not be reached ({_root_cause(chain)}) and {where} is not in "
            "the local cache. Check the network, proxy and HF_ENDPOINT; with the files cached, HF_HUB_OFFLINE=1 "
            "loads them without the network."
        )
    if status is not None and status >= 500:
        return (
            f"the Hub ({hub_constants.ENDPOINT}) kept answering HTTP {status} for {where} after its retries. "
            "Try again later."
        )
    if _first(chain, HFValidationError) is not None:
        return (
            f"'{model}' is neither an existing folder nor a valid Hub repository id (owner/name). "
            "Check the path or the id."
        )
    return None


def load_failure_message(error: BaseException, model: str, revision: str | None = None) -> str:
    """One line for any load failure: the Hub cause when there is one, else the error's own type and text."""
    cause = explain_hub_error(error, model, revision)
    if cause is None:
        cause = (
            f"{_root_cause([error])}. Check the Hub id or folder, --revision, and that the bundle was saved "
            "completely (publish_bundle.py writes a complete one)"
        )
        cause = cause if cause.endswith(".") else cause + "."
    return f"Could not load the model '{model}': {' '.join(cause.split())}"


def hub_load_error(error: BaseException, model: str, revision: str | None = None) -> HubLoadError:
    """The typed error (exit code 3) to raise ``from None`` in place of a raw load failure."""
    return HubLoadError(load_failure_message(error, model, revision))


def is_retryable(error: BaseException) -> bool:
    """Whether another attempt could succeed: not in offline mode, not after HTTP 401/403/404, not a bad id."""
    chain = list(exception_chain(error))
    if _first(chain, (OfflineModeIsEnabled, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError)):
        return False  # RepositoryNotFoundError covers GatedRepoError
    if any(_status(e) in PERMANENT_HTTP_STATUSES for e in chain):
        return False
    missing_file = _first(chain, EntryNotFoundError)
    if missing_file is not None and not isinstance(missing_file, LocalEntryNotFoundError):
        return False
    return not (offline_mode() and _first(chain, LocalEntryNotFoundError) is not None)


__all__ = [
    "HubLoadError",
    "PERMANENT_HTTP_STATUSES",
    "exception_chain",
    "explain_hub_error",
    "hub_load_error",
    "is_retryable",
    "load_failure_message",
]
