"""Gradio app of Visual Med-Alpaca (runs as a Hugging Face Space): upload an image, ask, follow up.

    python app.py --model org/visual-med-alpaca          # or: VISUAL_MED_ALPACA_MODEL=... python app.py
    python app.py --model build/demo_bundle --port 7860  # the offline demo bundle (make demo builds it)

- Upload a PNG/JPEG or DICOM file: the visual expert reads it once; the panel shows which expert, its
  intermediate text, the image's technical fields (never patient identity) and the disclaimer.
- Or upload a DICOM series (its files, or one .zip): the expert reads its key slices (see medical_series.py);
  the preview tiles them.
- Ask, then ask follow-ups: answers stream token by token; follow-ups reuse the image's intermediate
  text and the earlier turns (the pipeline trims the oldest turns when the context is full).
- Requests wait in a queue (CONCURRENCY_LIMIT at a time, at most QUEUE_MAX_SIZE waiting); uploads are
  capped at MAX_UPLOAD_SIZE; no public share link is ever created. Bad uploads and questions get a
  clear message and the app keeps serving.
- Nothing is fetched from the internet at run time: analytics are off and the theme uses system fonts.

API (``gradio_client``): ``/read_image`` (file) and ``/ask`` (question; streams) share a session, so a
client asks follow-ups the way the page does; ``/reset`` starts a new case.
``/read_series`` (a list of files, or one zip) reads a DICOM series in place of ``/read_image``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

# Before gradio is imported: no analytics/version calls to the internet from the server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from medical_image import load_image  # noqa: E402
from medical_series import load_series  # noqa: E402
from modeling_visual_med_alpaca import DISCLAIMER  # noqa: E402
from visual_med_alpaca_cli import EXIT_MODEL_LOAD, load_pipeline  # noqa: E402

CONCURRENCY_LIMIT = 2
QUEUE_MAX_SIZE = 16
MAX_UPLOAD_SIZE = "20mb"
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
DEFAULT_MODEL = os.environ.get("VISUAL_MED_ALPACA_MODEL", "build/demo_bundle")
ANSWER_MAX_NEW_TOKENS = 128
# System fonts only: the default theme loads Google Fonts in the visitor's browser.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def new_session() -> dict:
    """One case: the image read once (``expert``, ``intermediate_text``, ``image_metadata``) and its turns."""
    return {"image_key": None, "expert": None, "intermediate_text": None, "image_metadata": {}, "history": []}


# The marker publish_bundle.py's --card_notice puts in a demo bundle's model card (demo.py passes it).
DEMO_WEIGHTS_MARKER = "DEMO WEIGHTS"


def demo_weights_notice(vqa) -> str | None:
    """The notice line of the bundle's model card (``README.md``) when it holds demo weights, else ``None``.

    Read from the folder, or the Hub cache at the loaded revision; a bundle without a readable card has no notice.
    """
    from transformers.utils import cached_file

    source = getattr(vqa.model, "_bundle_source", None) or {"name_or_path": vqa.model.name_or_path}
    try:
        card = cached_file(
            source["name_or_path"],
            "README.md",
            revision=source.get("revision"),
            cache_dir=source.get("cache_dir"),
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        text = Path(card).read_text(encoding="utf-8") if card else ""
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        if DEMO_WEIGHTS_MARKER in line:
            return line.strip().lstrip(">").strip().strip("*").strip()
    return None


def _user_message(error: Exception) -> str:
    """Our typed errors carry a safe, actionable message; anything else gets a generic one."""
    if getattr(error, "exit_code", None) == 2:
        return f"⚠️ {error}"
    return "⚠️ The model could not answer this request. Please try again; if it persists, reload the page."


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def escape_markdown(text: str) -> str:
    """Model and file text is shown literally: a generated link, image or table must not render."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def render_panel(session: dict, status: str = "") -> str:
    lines = [status, ""] if status else []
    if session["image_key"] is None:
        lines.append("**Expert:** none (no image: questions are answered from text alone)")
    else:
        lines.append(f"**Expert:** {session['expert']}")
        text = escape_markdown(session["intermediate_text"] or "(empty)")
        lines.append(f"**Intermediate text** (what the language model is told about the image):\n\n> {text}")
        if session["image_metadata"]:
            fields = "\n".join(
                f"| {escape_markdown(key)} | {escape_markdown(value)} |"
                for key, value in sorted(session["image_metadata"].items())
            )
            lines.append(f"**Image technical fields:**\n\n| field | value |\n|---|---|\n{fields}")
    # Counts finished turns only (it changes when an answer is complete, not while it streams).
    lines.append(f"**Turns so far:** {len(session['history'])}")
    lines.append(f"\n---\n_{DISCLAIMER}_")
    return "\n\n".join(lines)


def transcript(session: dict) -> list[dict]:
    """The session's turns as Chatbot messages."""
    chat = []
    for turn in session["history"]:
        chat += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    return chat


def build_app(vqa) -> gr.Blocks:
    """The Blocks app around a loaded ``visual-med-alpaca`` pipeline (tests pass the tiny bundle's)."""

    def read_image(upload, session):
        session = new_session()
        if upload is None:
            return None, session, [], render_panel(session)
        path = upload if isinstance(upload, str) else upload.name
        try:
            data = Path(path).read_bytes()
            preview = load_image(data).image  # DICOM is windowed to 8 bit for display
            described = vqa.describe_image(data)
        except Exception as error:
            return None, session, [], render_panel(session, _user_message(error))
        session.update(
            image_key=hashlib.sha256(data).hexdigest(),
            expert=described["expert"],
            intermediate_text=described["intermediate_text"],
            image_metadata=described["image_metadata"],
        )
        status = " ".join(f"⚠️ {w}" for w in described["warnings"])
        return preview, session, [], render_panel(session, status)

    def read_series(uploads, session):
        """A DICOM series: several files, or one .zip; the preview tiles the key slices the expert reads."""
        session = new_session()
        if not uploads:
            return None, session, [], render_panel(session)
        try:
            files = [Path(upload if isinstance(upload, str) else upload.name).read_bytes() for upload in uploads]
            source = files[0] if len(files) == 1 and files[0][:4] == b"PK\x03\x04" else files  # one zip, or slices
            preview = load_series(source, series_mode="montage").images[0].image
            described = vqa.describe_image(source)
        except Exception as error:
            return None, session, [], render_panel(session, _user_message(error))
        session.update(
            image_key=hashlib.sha256(b"".join(hashlib.sha256(data).digest() for data in files)).hexdigest(),
            expert=described["expert"],
            intermediate_text=described["intermediate_text"],
            image_metadata=described["image_metadata"],
        )
        status = " ".join(f"⚠️ {w}" for w in described["warnings"])
        return preview, session, [], render_panel(session, status)

    def ask(question, session):
        # The transcript is rebuilt from the session, so API clients and the page see the same conversation.
        chat = transcript(session)
        question = (question or "").strip()
        if not question:
            yield "", chat, session, render_panel(session, "⚠️ Type a question first.")
            return
        request = {"question": question, "history": list(session["history"])}
        if session["image_key"] is not None:
            request.update(expert=session["expert"], intermediate_text=session["intermediate_text"])
        chat = [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            for piece in vqa.stream(request, max_new_tokens=ANSWER_MAX_NEW_TOKENS):
                if isinstance(piece, dict):
                    record = piece
                else:
                    chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + piece}
                    yield "", chat, session, render_panel(session)
        except Exception as error:
            chat[-1] = {"role": "assistant", "content": _user_message(error)}
            yield question, chat, session, render_panel(session, _user_message(error))
            return
        chat[-1] = {"role": "assistant", "content": record["answer"] or "(empty answer)"}
        session = {**session, "history": [*session["history"], {"question": question, "answer": record["answer"]}]}
        status = " ".join(f"⚠️ {w}" for w in record["warnings"])
        yield "", chat, session, render_panel(session, status)

    def reset():
        session = new_session()
        return None, None, session, [], render_panel(session)

    notice = demo_weights_notice(vqa)
    with gr.Blocks(title="Visual Med-Alpaca (research use only)", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Visual Med-Alpaca\nUpload a radiology image (PNG/JPEG/DICOM) or a chart, then ask. "
            "**Research use only — not for clinical decisions.**"
        )
        if notice:
            gr.Markdown(f"⚠️ **{escape_markdown(notice)}**", elem_id="demo-notice")
        session = gr.State(new_session())
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG or DICOM)", file_types=UPLOAD_TYPES, elem_id="upload")
                # Any file type: DICOM files from an archive often have no extension (content decides).
                series_upload = gr.File(
                    label="Or a DICOM series (its files, or one .zip)", file_count="multiple", elem_id="series-upload"
                )
                preview = gr.Image(label="As the model sees it", interactive=False, elem_id="preview")
                # Labelled so the API names this output ("Case", not "value_7").
                panel = gr.Markdown(render_panel(new_session()), label="Case", elem_id="panel")
            with gr.Column(scale=2):
                # Model text is shown as plain text: a generated link or image tag must not render.
                chat = gr.Chatbot(label="Conversation", elem_id="chat", height=420, render_markdown=False)
                question = gr.Textbox(label="Question", placeholder="What abnormality is seen?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    new_case = gr.Button("New case", elem_id="reset")
        upload.change(read_image, [upload, session], [preview, session, chat, panel], api_name="read_image")
        series_upload.change(
            read_series, [series_upload, session], [preview, session, chat, panel], api_name="read_series"
        )
        gr.on(
            [send.click, question.submit],
            ask,
            [question, session],
            [question, chat, session, panel],
            api_name="ask",
        )
        new_case.click(reset, None, [upload, preview, session, chat, panel], api_name="reset")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_MAX_SIZE)
    return demo


def launch(demo: gr.Blocks, port: int | None = None, **kwargs):
    """Launch settings in one place: never a public share link, uploads capped, local fonts."""
    return demo.launch(server_port=port, share=False, max_file_size=MAX_UPLOAD_SIZE, theme=THEME, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub repository id or local bundle folder.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--load-in-8bit", action="store_true")
    parser.add_argument("--port", type=int, default=None, help="Default: $GRADIO_SERVER_PORT or 7860.")
    args = parser.parse_args(argv)
    try:
        vqa = load_pipeline(args.model, args.revision, args.load_in_8bit)
    except Exception as error:  # one line with the cause, the CLI's exit code 3, no traceback
        if getattr(error, "exit_code", None) != EXIT_MODEL_LOAD:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_MODEL_LOAD
    launch(build_app(vqa), port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
