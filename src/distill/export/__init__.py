"""Export: Hugging Face directories (always) and GGUF files (F16, Q8_0, Q4_0, Q4_1) for
llama.cpp."""

from distill.export.gguf import FILE_TOLERANCE, GGUF_TYPES, export_gguf, verify_gguf

__all__ = ["GGUF_TYPES", "FILE_TOLERANCE", "export_gguf", "verify_gguf"]
