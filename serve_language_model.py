"""Serve a bundle's merged language model with ``transformers serve``, for the OpenAI-compatible backend.

``transformers serve`` cannot serve the composite remote-code model: this exports the bundle's
``language_model`` with its tokenizer (and chat template) to a folder and serves that folder.

    python serve_language_model.py --bundle org/visual-med-alpaca --output_dir med-alpaca-lm --port 8000
    python serve_language_model.py --config serve.yaml

then, in Python::

    vqa(request, backend={"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "med-alpaca-lm"})

The tests and ``benchmarks/bench_language_backends.py`` use ``export_language_model`` and the
``transformers_serve`` context manager directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeArguments:
    bundle: str = field(metadata={"help": "Bundle folder or Hub repository id."})
    output_dir: str = field(default="med-alpaca-lm", metadata={"help": "Where the merged language model goes."})
    host: str = field(default="127.0.0.1", metadata={"help": "Listen address."})
    port: int = field(default=8000, metadata={"help": "Listen port."})
    device: str = field(default="auto", metadata={"help": "Device for transformers serve (cpu, cuda:0, auto)."})


def export_language_model(model, tokenizer, output_dir) -> Path:
    """Save the bundle's merged language model and its tokenizer (with the chat template) as a plain LM folder."""
    output_dir = Path(output_dir)
    model.language_model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if not getattr(tokenizer, "chat_template", None):
        print("The tokenizer has no chat template: use backend api='completions' with this server.")
    return output_dir


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def transformers_serve(
    model_dir, host: str = "127.0.0.1", port: int | None = None, device: str = "cpu", startup_timeout: float = 240
) -> Iterator[str]:
    """Run ``transformers serve MODEL_DIR`` until the block ends; yields the ``base_url`` (``.../v1``).

    The server's output goes to ``serve.log`` beside the model folder; it is shown if the server fails to start.
    """
    port = port or free_port(host)
    log_path = Path(model_dir).parent / "serve.log"
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir)]
    command += ["--host", host, "--port", str(port), "--device", device]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(host, port):
            if server.poll() is not None:
                raise RuntimeError(f"transformers serve exited:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"transformers serve did not start in {startup_timeout:g} s:\n{log_path.read_text()}"
                )
            time.sleep(0.5)
        yield f"http://{host}:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(args: ServeArguments) -> None:
    from transformers import AutoModel, AutoTokenizer

    print(f"Loading the bundle {args.bundle} ...")
    model = AutoModel.from_pretrained(args.bundle, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(args.bundle, trust_remote_code=True)
    model_dir = export_language_model(model, tokenizer, args.output_dir)
    print(f"Merged language model saved to {model_dir}; starting transformers serve ...")
    with transformers_serve(model_dir, host=args.host, port=args.port, device=args.device) as base_url:
        print(f'Serving: backend={{"type": "openai", "base_url": "{base_url}", "model": "{model_dir}"}}')
        print("Ctrl+C stops the server.")
        signal.signal(signal.SIGTERM, _stop)  # a plain SIGTERM would skip the clean-up and orphan the server
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    from trl import TrlParser

    (serve_args,) = TrlParser(ServeArguments).parse_args_and_config()
    main(serve_args)
