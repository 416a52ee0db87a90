"""Runs a printed ``hf upload ...`` retry command through huggingface_hub's real CLI, with the Hub calls recorded.

The command line is parsed and executed by ``huggingface_hub.cli`` itself (the ``hf`` entry point's app); only
``HfApi.create_repo`` / ``HfApi.upload_folder`` are replaced, so a test sees exactly what the command would create
and upload: the privacy of a new repository and the files left after the command's ``--exclude`` patterns.
"""

import shlex
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub.hf_api import HfApi
from huggingface_hub.utils import filter_repo_objects


def retry_command_from(message: str) -> list[str]:
    """The argv of the ``hf upload`` line in an error message or log output."""
    line = next(line for line in message.splitlines() if line.strip().startswith("hf upload "))
    return shlex.split(line.strip())


def run_hf_cli(argv: list[str], monkeypatch) -> dict:
    """Run ``argv`` (starting with ``hf``) in process; returns ``{"private", "repo_id", "uploaded": [paths]}``."""
    from huggingface_hub.cli.hf import app

    calls: dict = {}

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, private=None, **kwargs):
        calls.update(repo_id=repo_id, private=private, repo_type=repo_type)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["uploaded"] = list(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        calls["path_in_repo"] = kwargs.get("path_in_repo")
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert argv[:2] == ["hf", "upload"], argv
    app(args=argv[1:], prog_name="hf", standalone_mode=False)
    return calls
