"""The vector artifact and its importers and exporters (.pt, GGUF control vector)."""
