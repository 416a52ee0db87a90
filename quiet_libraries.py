"""Silence library messages a user cannot act on, and nothing else.

Each entry names the logger that emits the message and how the message starts, so a filter drops exactly
that message; every other warning of the same library still shows (``tests/test_quiet_libraries.py``):

- bitsandbytes, on import on CPUs with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from
  kernels-community ..." — an optional Hub-fetched kernel (the ``kernels`` package) that this project does
  not install on purpose (it downloads code from the Hub); the built-in CPU path is used instead.
- bitsandbytes, on every 8-bit matmul whose input is not float16: "MatMul8bitLt: inputs will be cast from
  torch.float32 to float16 during quantization" — about 40 lines per answer. The cast is how LLM.int8
  works; loading the unquantised parts in float16 (the default with ``load_in_8bit``) avoids most of it.

Call :func:`quiet_library_noise` before bitsandbytes is imported (the first message is logged at import).
The CLI, ``app.py`` and ``demo.py`` do.
"""

from __future__ import annotations

import logging

# logger name -> message prefixes dropped from it
LIBRARY_NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}


class DropMessages(logging.Filter):
    """Drops records whose formatted message starts with one of ``prefixes``; passes everything else."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the filters (idempotent). Loggers are created here if needed, so this works before import."""
    for name, prefixes in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


__all__ = ["LIBRARY_NOISE", "DropMessages", "quiet_library_noise"]
