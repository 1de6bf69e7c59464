"""Export: Hugging Face directories (always) and GGUF files (F16, Q8_0) for llama.cpp."""

from distill.export.gguf import GGUF_TYPES, TOLERANCES, export_gguf, verify_gguf

__all__ = ["GGUF_TYPES", "TOLERANCES", "export_gguf", "verify_gguf"]
