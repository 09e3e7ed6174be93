"""GGUF bakes for llama.cpp and ollama: a bake applied to an existing GGUF (bias, ortho), or an
export folder converted by llama.cpp's own converter. See docs/gguf.md."""

from bakery.gguf.folder import MANIFEST, gguf_bake
from bakery.gguf.read import GGUFError

__all__ = ["gguf_bake", "GGUFError", "MANIFEST"]
