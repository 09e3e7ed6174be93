"""One module per serving engine: transformers and vllm run the export (real runs), sglang reads
it against its loading rules (rules only, not run); common holds the verdict and the shared
setup, verify the orchestration and the rendering of verdicts."""
