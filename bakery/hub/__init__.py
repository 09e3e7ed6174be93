"""Publish an export folder to the Hugging Face Hub (``bakery push``).

Steps: plan the upload (the files of a bakery export, refusing stray files such as checkpoints and
caches unless ``include`` lets them through), check the folder (manifest, weights, vector
checksums) and its model card (parses with ``huggingface_hub.ModelCard``, carries ``base_model``,
``base_model_relation``, ``library_name``, the tags and the base's license), run ``bakery verify
--engine transformers``, then ``create_repo(exist_ok=True)`` and one ``create_commit`` with every
file, so the repo never holds half a push. Transient Hub failures are retried with backoff; a
rejected token (401), a missing permission (403) and a conflict (409) become one clear error.

``check`` holds the local checks (plan, export, card), ``upload`` the token, the retries and the
upload. The token comes from ``HF_TOKEN`` or the client's stored login. It is handed to the client
and never printed, logged or written.
"""

from bakery.hub.check import (BASE_MODEL_RELATIONS, EXPORT_PATTERNS, REQUIRED_TAGS, CardError, NotPublishable,
                              PlannedFile, PushPlan, StrayFiles, base_license, card_for_repo, check_card,
                              check_export, human_size, plan_upload)
from bakery.hub.upload import (TRANSIENT_STATUS, PushError, PushResult, check_no_clash, explain, is_transient,
                             prepare, push, resolve_token, run_verify, with_retries)

__all__ = [
    "BASE_MODEL_RELATIONS", "EXPORT_PATTERNS", "REQUIRED_TAGS", "TRANSIENT_STATUS", "CardError", "NotPublishable",
    "PlannedFile", "PushError", "PushPlan", "PushResult", "StrayFiles", "base_license", "card_for_repo",
    "check_card", "check_export", "check_no_clash", "explain", "human_size", "is_transient", "plan_upload",
    "prepare", "push", "resolve_token", "run_verify", "with_retries",
]
