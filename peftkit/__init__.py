"""peftkit: parameter-efficient adaptation of large language models."""

from peftkit.utils.log_filters import silence_library_notices

__version__ = "0.1.0"

silence_library_notices()  # before transformers / bitsandbytes / DeepSpeed are imported, which log some on import
