"""One module per serving engine (transformers, vllm, sglang, llama.cpp), each a real run in its own
environment (:mod:`~bakery.engines.runner`); :mod:`~bakery.engines.verdict` holds the result of a
check, :mod:`~bakery.engines.setup` what the checks of one export share, and
:mod:`~bakery.engines.verify` the orchestration and the rendering of verdicts."""
