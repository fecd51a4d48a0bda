"""The GGUF tensor types exports write (a module of its own: the CLI's argument parser lists them without loading torch)."""

GGUF_TYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""`--gguf-type` choices, finer to coarser: the float and block-quantized types gguf-py can write. The K-quants
(Q4_K_M, ...) come from llama.cpp's own `llama-quantize` run on an f16 export (docs/export.md)."""
ADAPTER_GGUF_TYPES = ("f32", "f16", "q8_0")
"""A GGUF LoRA's types: its A/B matrices are small, and llama.cpp adds their product to a quantized base anyway."""
