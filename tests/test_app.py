"""The Gradio app: its API through gradio_client, and the page in a real (headless Debian) Chromium."""

import inspect
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from modeling_visual_med_alpaca import DISCLAIMER

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSER_SCRIPT = REPO_ROOT / "tests" / "browser" / "app_in_chromium.cjs"
NODE_MODULES = REPO_ROOT / "build" / "browser" / "node_modules"
SCREENSHOT = REPO_ROOT / "build" / "app_browser.png"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_demo(vqa):
    import app

    demo = app.build_app(vqa)
    app.launch(demo, port=_free_port(), prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def app_url(app_demo):
    return app_demo.local_url


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)  # one client = one session (its own gr.State)


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _as_chatbot_shows(answer: str) -> str:
    """gr.Chatbot runs messages through inspect.cleandoc (drops common indentation of later lines)."""
    return inspect.cleandoc(answer or "(empty answer)")


def _expected_answer(vqa, description, question, history=()):
    import app

    request = {
        "question": question,
        "expert": description["expert"],
        "intermediate_text": description["intermediate_text"],
        "history": list(history),
    }
    return vqa(request, max_new_tokens=app.ANSWER_MAX_NEW_TOKENS)["answer"]


def test_api_reads_the_image_once_and_answers_follow_ups(client, vqa, radiology_images):
    from gradio_client import handle_file

    import app

    image = radiology_images[0]
    preview, chat, panel = client.predict(handle_file(str(image)), api_name="/read_image")
    description = vqa.describe_image(str(image))
    assert Path(preview).exists() and chat == []
    assert f"**Expert:** {description['expert']}" in panel
    assert app.escape_markdown(description["intermediate_text"]) in panel and DISCLAIMER in panel
    assert "| width |" in panel and "| height |" in panel

    question_box, chat, panel = client.predict("What abnormality is seen?", api_name="/ask")
    first = _expected_answer(vqa, description, "What abnormality is seen?")
    assert question_box == "" and [m["role"] for m in chat] == ["user", "assistant"]
    assert _text(chat[1]) == _as_chatbot_shows(first)

    _, chat, _ = client.predict("Which side is affected?", api_name="/ask")
    history = [{"question": "What abnormality is seen?", "answer": first}]
    follow_up = _expected_answer(vqa, description, "Which side is affected?", history)
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2
    assert _text(chat[3]) == _as_chatbot_shows(follow_up)

    _, _, chat, panel = client.predict(api_name="/reset")
    assert chat == [] and "none (no image" in panel


def test_bad_upload_shows_a_message_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"PATIENT-NAME-DOE" * 8)
    preview, chat, panel = client.predict(handle_file(str(bad)), api_name="/read_image")
    assert preview is None and "⚠️ The data is not an image in an accepted format" in panel and "PATIENT" not in panel
    # Still serving: an empty question gets a message, a real one an answer (text-only: no image kept).
    _, chat, panel = client.predict("   ", api_name="/ask")
    assert chat == [] and "Type a question first" in panel
    _, chat, panel = client.predict("What treats hair loss?", api_name="/ask")
    assert [m["role"] for m in chat] == ["user", "assistant"] and "none (no image" in panel


def test_dicom_upload_never_shows_identity(client):
    import pydicom
    from gradio_client import handle_file

    dicom_path = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    dataset = pydicom.dcmread(dicom_path)
    identity = [str(dataset.get(k)) for k in ("PatientName", "PatientID", "InstitutionName") if dataset.get(k)]
    assert identity
    _, _, panel = client.predict(handle_file(str(dicom_path)), api_name="/read_image")
    assert DISCLAIMER in panel
    assert not any(value in panel for value in identity)


def test_queue_upload_limit_and_no_share_link(app_demo, client, tmp_path):
    from gradio_client import handle_file

    import app

    assert app_demo._queue.default_concurrency_limit == app.CONCURRENCY_LIMIT
    assert app_demo._queue.max_size == app.QUEUE_MAX_SIZE
    assert app_demo.share is False and app_demo.share_url is None
    assert client.config["max_file_size"] == 20 * 1024 * 1024
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    oversized = tmp_path / "huge.png"
    oversized.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024))
    with pytest.raises(ValueError, match="maximum file size"):  # the client checks the server's limit...
        client.predict(handle_file(str(oversized)), api_name="/read_image")
    # ...and the server enforces it for any uploader.
    refused = httpx.post(app_demo.local_url + "gradio_api/upload", files={"files": oversized.open("rb")}, timeout=60)
    assert refused.status_code == 413
    _, chat, _ = client.predict("Still serving?", api_name="/ask")
    assert [m["role"] for m in chat] == ["user", "assistant"]


def test_app_in_headless_chromium(app_url, vqa, radiology_images):
    """A real browser: upload, ask, follow up, screenshot. `make test` installs chromium and playwright-core."""
    node = shutil.which("node")
    assert node and Path("/usr/bin/chromium").exists() and (NODE_MODULES / "playwright-core").exists(), (
        "run `make test` (or `make browser-deps`) to install Debian's chromium and playwright-core"
    )
    image = radiology_images[1]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    result = subprocess.run(
        [node, str(BROWSER_SCRIPT), app_url, str(image), str(SCREENSHOT)],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = json.loads(result.stdout.strip().splitlines()[-1])
    description = vqa.describe_image(str(image))
    first = _expected_answer(vqa, description, "What abnormality is seen?")
    follow_up = _expected_answer(
        vqa, description, "Which side is affected?", [{"question": "What abnormality is seen?", "answer": first}]
    )
    assert " ".join(page["firstAnswer"].split()) == " ".join((first or "(empty answer)").split())
    assert " ".join(page["followUpAnswer"].split()) == " ".join((follow_up or "(empty answer)").split())
    assert page["userMessages"] == ["What abnormality is seen?", "Which side is affected?"]
    assert "Expert: radiology" in page["panel"] and DISCLAIMER in page["panel"]
    # The expert's text is shown literally (escaped, not rendered as Markdown).
    assert " ".join(description["intermediate_text"].split()) in " ".join(page["panel"].split())
    assert page["externalRequests"] == []  # nothing fetched from the internet
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_outputs_all_have_names(client):
    api = client.view_api(return_format="dict", print_info=False)
    names = {
        endpoint: [value["label"] for value in spec["parameters"] + spec["returns"]]
        for endpoint, spec in api["named_endpoints"].items()
    }
    assert set(names) >= {"/read_image", "/ask", "/reset"}
    for endpoint, labels in names.items():
        assert all(label and not label.startswith("value_") for label in labels), (endpoint, labels)
    assert "Case" in names["/ask"]


def test_demo_weights_bundle_shows_the_notice_and_real_weights_do_not(vqa, bundle_dir, tmp_path):
    from transformers import pipeline

    import app

    def notice_blocks(demo):
        return [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "demo-notice"]

    assert app.demo_weights_notice(vqa) is None  # the test bundle has no card
    assert notice_blocks(app.build_app(vqa)) == []
    demo_bundle = tmp_path / "demo_bundle"
    shutil.copytree(bundle_dir, demo_bundle)
    notice = "DEMO WEIGHTS: tiny models trained for about a minute on a CPU; their answers mean nothing."
    (demo_bundle / "README.md").write_text(f"---\nlicense: other\n---\n# Card\n\n> **{notice}**\n")
    demo_vqa = pipeline(model=str(demo_bundle), trust_remote_code=True)
    assert app.demo_weights_notice(demo_vqa) == notice
    [block] = notice_blocks(app.build_app(demo_vqa))
    assert "DEMO WEIGHTS" in block.value
