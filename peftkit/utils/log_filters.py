"""Logging filters for library notices that tell a peftkit user nothing to act on.

They are installed when `peftkit` is imported (not only by the CLI), because some of these notices are logged while
a library is being imported: a Python script that imports peftkit first sees the same quiet output as the command."""

from __future__ import annotations

import logging

BNB_HUB_KERNEL_ADVICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""bitsandbytes on AVX512-BF16 CPUs: `pip install kernels` for a 4-bit kernel fetched from the Hugging Face Hub; not
advice to follow offline, and the built-in path works without it."""
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU."
"""DeepSpeed (imported by transformers on every run) on a machine without a GPU: a CPU run is meant to be one. It
writes this to stdout, where it would mix with what a command prints."""


class PrefixFilter(logging.Filter):
    """Drop records whose message starts with `prefix` (all of them, or all but the first)."""

    def __init__(self, prefix: str, keep_first: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        self.keep_first = keep_first

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        if self.keep_first:
            self.keep_first = False
            return True
        return False


def add_prefix_filter(logger_name: str, new: PrefixFilter) -> None:
    """Idempotent: one filter per logger and prefix, however often a loader runs."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, PrefixFilter) and f.prefix == new.prefix for f in logger.filters):
        logger.addFilter(new)


def silence_library_notices() -> None:
    add_prefix_filter("bitsandbytes.backends.cpu.ops", PrefixFilter(BNB_HUB_KERNEL_ADVICE))
    add_prefix_filter("DeepSpeed", PrefixFilter(DEEPSPEED_CPU_NOTICE))
