"""Hub load failures say what happened — in hub_errors, the CLI, app.py and evaluate_vqa.py.

The exceptions are huggingface_hub's own: built by its ``hf_raise_for_status`` from real HTTP responses, a real
refused connection, and end to end through ``pipeline(...)`` against a local stub of the Hub's HTTP API (the
headers the Hub sends: ``X-Error-Code: RepoNotFound | GatedRepo | RevisionNotFound``) or with HF_HUB_OFFLINE=1.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status

import hub_errors
from hub_errors import explain_hub_error, is_retryable, load_failure_message

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "org/visual-med-alpaca"


def _hub_error(status: int, error_code: str | None = None, revision: str = "main") -> Exception:
    """What huggingface_hub raises for this response of the Hub, wrapped the way transformers wraps it."""
    url = f"https://huggingface.co/{MODEL}/resolve/{revision}/config.json"
    headers = {"X-Error-Code": error_code} if error_code else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        try:
            hf_raise_for_status(response)
        except Exception as hub_error:
            raise OSError("We couldn't load this model (transformers' generic text).") from hub_error
    except OSError as wrapped:
        return wrapped
    raise AssertionError("hf_raise_for_status did not raise")


def _refused_connection() -> Exception:
    """A real refused connection (a closed local port) inside the LocalEntryNotFoundError hf_hub raises for it."""
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    try:
        try:
            # huggingface_hub's HTTP client (its session refuses before connecting while the suite is offline)
            httpx2.Client().head(f"http://127.0.0.1:{port}/{MODEL}/resolve/main/config.json")
        except Exception as connect_error:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from (
                connect_error
            )
    except LocalEntryNotFoundError as wrapped:
        return wrapped
    raise AssertionError("the connection was not refused")


@pytest.mark.parametrize(
    ("error", "says", "retryable"),
    [
        (lambda: _hub_error(404, "RepoNotFound"), ["no repository 'org/visual-med-alpaca'", "HTTP 404"], False),
        (lambda: _hub_error(401, "RepoNotFound"), ["private", "HTTP 401", "HF_TOKEN"], False),
        (lambda: _hub_error(403, "GatedRepo"), ["gated", "Request access", "HTTP 403"], False),
        (lambda: _hub_error(404, "RevisionNotFound", "v9"), ["no revision 'v9'", "--revision"], False),
        (lambda: _hub_error(404, "EntryNotFound"), ["lacks a file", "not a complete"], False),
        (lambda: _hub_error(403), ["refused access", "HTTP 403"], False),
        (lambda: _hub_error(503), ["HTTP 503", "Try again later"], True),
        (
            lambda: OfflineModeIsEnabled("Cannot reach the Hub: offline mode"),
            ["offline mode (HF_HUB_OFFLINE=1)"],
            False,
        ),
        (_refused_connection, ["could not be reached", "Connection refused", "HF_ENDPOINT"], True),
    ],
    ids=["no-repo", "private", "gated", "revision", "missing-file", "forbidden", "server", "offline", "unreachable"],
)
def test_each_hub_failure_names_its_cause_and_whether_a_retry_can_help(error, says, retryable, monkeypatch):
    monkeypatch.setattr(hub_errors, "offline_mode", lambda: False)  # the suite itself runs with HF_HUB_OFFLINE=1
    error = error()
    message = load_failure_message(error, MODEL, "v9")
    assert message.startswith(f"Could not load the model '{MODEL}': ")
    for text in says:
        assert text in message, message
    assert "\n" not in message
    assert is_retryable(error) is retryable


def test_offline_mode_turns_a_cache_miss_into_the_offline_cause(monkeypatch):
    miss = LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic is off.")
    monkeypatch.setattr(hub_errors, "offline_mode", lambda: True)
    assert "offline mode (HF_HUB_OFFLINE=1)" in explain_hub_error(miss, MODEL)
    assert not is_retryable(miss)
    monkeypatch.setattr(hub_errors, "offline_mode", lambda: False)
    assert "could not be reached" in explain_hub_error(miss, MODEL)
    assert is_retryable(miss)


def test_a_failure_that_is_not_about_the_hub_keeps_its_own_cause():
    error = ValueError("Unrecognized model in /tmp/x. Should have a `model_type` key in its config.json.")
    assert explain_hub_error(error, "/tmp/x") is None
    message = load_failure_message(error, "/tmp/x")
    assert "ValueError: Unrecognized model in /tmp/x" in message and ".." not in message


# ---------------------------------------------------------------------------------- end to end, through pipeline()


class _StubHub(http.server.BaseHTTPRequestHandler):
    """Answers every Hub request like the Hub does for one failure (``server.failure``)."""

    def log_message(self, *args):
        pass

    def _reply(self):
        status, code = self.server.failure
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _reply


@pytest.fixture(scope="module")
def stub_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    server.failure = (404, "RepoNotFound")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _run(script: str, *args, stub=None, cwd=None, tmp_path=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    if stub is not None:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{stub.server_port}")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def _one_line_error(result, *says):
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"error: Could not load the model '{MODEL}': "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for text in says:
        assert text in result.stderr, result.stderr


def test_cli_names_a_private_or_missing_repository(stub_hub, tmp_path):
    stub_hub.failure = (401, "RepoNotFound")
    _one_line_error(_run("visual_med_alpaca_cli.py", "ask", "--model", MODEL, "Q?", stub=stub_hub, tmp_path=tmp_path),
                    "HTTP 401", "private")  # fmt: skip


def test_cli_names_a_gated_repository(stub_hub, tmp_path):
    stub_hub.failure = (403, "GatedRepo")
    result = _run("visual_med_alpaca_cli.py", "caption", "--model", MODEL, "x.png", stub=stub_hub, tmp_path=tmp_path)
    _one_line_error(result, "gated", "Request access")


def test_cli_names_offline_mode(tmp_path):
    _one_line_error(_run("visual_med_alpaca_cli.py", "ask", "--model", MODEL, "Q?", tmp_path=tmp_path), "offline mode")


def test_app_exits_3_with_one_line_like_the_cli(tmp_path):
    result = _run("app.py", "--model", MODEL, tmp_path=tmp_path)
    _one_line_error(result, "offline mode")


def test_evaluate_names_a_missing_revision_and_leaves_nothing_that_blocks_the_rerun(stub_hub, tmp_path, bundle_dir):
    stub_hub.failure = (404, "RevisionNotFound")
    output_dir = tmp_path / "eval"
    questions = REPO_ROOT / "data" / "vqa_rad_dev" / "questions.json"
    common = ["--data_path", questions, "--output_dir", output_dir, "--limit", "1", "--max_new_tokens", "2"]
    result = _run("evaluate_vqa.py", "--model", MODEL, "--revision", "v9", *common, stub=stub_hub, tmp_path=tmp_path)
    _one_line_error(result, "no revision 'v9'")
    assert not (output_dir / "run_config.json").exists()
    # The corrected rerun (another model, no revision) is not refused as "different settings".
    rerun = _run("evaluate_vqa.py", "--model", bundle_dir, *common, tmp_path=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((output_dir / "run_config.json").read_text())["model"] == str(bundle_dir)


def test_evaluate_help_lists_config_and_config_still_loads(tmp_path):
    import evaluate_vqa

    result = _run("evaluate_vqa.py", "--help", tmp_path=tmp_path)
    assert result.returncode == 0 and "--config RECIPE_YAML" in result.stdout
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {MODEL}\ndata_path: q.json\nlimit: 3\n")
    args = evaluate_vqa.parse_arguments(["--config", str(recipe), "--limit", "2"])
    assert (args.model, args.data_path, args.limit) == (MODEL, "q.json", 2)
