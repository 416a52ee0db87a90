"""Pushing a finished folder to the Hugging Face Hub: one contract for train_git.py, train_sft.py and publish_bundle.py.

- The repository is created private unless the user chose public, and the same files are left out every time:
  resumable checkpoints (optimizer, scheduler and RNG states), TensorBoard logs and pickled training arguments.
- A push is attempted ``attempts`` times with a doubling wait; errors that cannot succeed on a retry (offline mode,
  401/403/404, a bad repo id) are not retried: ``hub_errors.is_retryable``, the one rule for loads and pushes.
- A failed push raises ``HubPushError`` (exit code 5, ``PUSH_FAILED_EXIT_CODE``). The local folder is never touched,
  and the error carries the ``hf upload`` command that retries the same push: same repository, same privacy, same
  exclusions (``hf upload`` passes ``--exclude`` patterns to ``upload_folder`` as ``ignore_patterns``, and
  ``--private`` applies only when it creates the repository; huggingface_hub's ``cli/upload.py``).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from hub_errors import is_retryable
from modeling_visual_med_alpaca import VisualMedAlpacaError

PUSH_FAILED_EXIT_CODE = 5
# fnmatch patterns on paths relative to the folder ("*" also matches "/"): nothing resumable or pickled leaves, nor
# the run's local bookkeeping (run_fingerprint.json holds local paths).
PUSH_EXCLUDE = ("checkpoint-*", "runs/*", "*.pt", "*.pth", "rng_state*", "training_args.bin", "run_fingerprint.json")


class HubPushError(VisualMedAlpacaError):
    """The output was saved, but pushing it to the Hub failed; ``retry_command`` repeats the push."""

    exit_code = PUSH_FAILED_EXIT_CODE
    http_status = 502

    def __init__(self, message: str, folder: Path | None = None, retry_command: list[str] | None = None):
        super().__init__(message)
        self.folder = folder
        self.retry_command = retry_command or []
        self.result = None  # what the script produced before the push (train_git: its CaptionTrainingResult)


def retry_command(repo_id: str, folder: str | Path, private: bool) -> list[str]:
    """The ``hf upload`` argv that repeats a push of ``folder`` to ``repo_id`` (no token: ``hf auth login`` first)."""
    argv = ["hf", "upload", repo_id, str(folder), ".", "--repo-type", "model"]
    argv.append("--private" if private else "--no-private")
    for pattern in PUSH_EXCLUDE:
        argv += ["--exclude", pattern]
    return argv


def http_status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message`` (+ HTTP status), short: the cause, not only the class."""
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    status = http_status(error)
    text = type(error).__name__ + (f", HTTP {status}" if status else "") + (f": {first_line}" if first_line else "")
    return text if len(text) <= 240 else text[:237] + "..."


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload",
    attempts: int = 1,
    retry_wait: float = 10.0,
    what: str = "output",
    api=None,
):
    """``create_repo`` + ``upload_folder`` with ``PUSH_EXCLUDE`` left out; returns the ``CommitInfo``.

    Raises ``HubPushError`` after the last attempt, or at once for an error a retry cannot fix.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = api or HfApi(token=token)
    last_error = None
    for attempt in range(1, max(1, attempts) + 1):
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=str(folder),
                commit_message=commit_message,
                ignore_patterns=list(PUSH_EXCLUDE),
            )
        except Exception as error:  # network, auth, permissions, offline mode: the folder stays either way
            last_error = error
            print(f"Push attempt {attempt}/{attempts} to {repo_id} failed: {describe_error(error)}", file=sys.stderr)
            if not is_retryable(error):
                break
            if attempt < attempts:
                time.sleep(retry_wait * 2 ** (attempt - 1))
    command = retry_command(repo_id, folder, private)
    raise HubPushError(
        f"Pushing to {repo_id} failed ({describe_error(last_error)}). The {what} is complete in {folder} and was not "
        f"changed. Retry the push (after `hf auth login`, or with HF_TOKEN set) with:\n    {shlex.join(command)}",
        folder=folder,
        retry_command=command,
    )
