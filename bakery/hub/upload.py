"""Publishing to the Hub: token, retries with backoff on transient failures, errors that say
what to do, and the push itself (``create_repo(exist_ok=True)`` and one ``create_commit`` with
every file, so the repo never holds half a push).

The token comes from ``HF_TOKEN`` or the client's stored login. It is handed to the client and
never printed, logged or written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bakery.errors import BakeryError
from bakery.hub.check import PlannedFile, PushPlan, card_for_repo, check_card, check_export, human_size, plan_upload
from bakery.io.manifest import Manifest

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class PushError(BakeryError):
    """The Hub refused or failed the push; the message says why and what to do."""


def run_verify(export_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[Any]:
    """``bakery verify --engine transformers``: reload the export with stock transformers and check
    it against runtime steering; the verdicts land in the card's engines section. Raises PushError
    when the export fails it."""
    from bakery.engines.verify import verify

    verdicts = verify([Path(export_dir)], "transformers", write=True, log=log)[str(Path(export_dir))]
    bad = [v for v in verdicts if not v.ok]
    for v in verdicts:
        log(f"verify {v.engine}: {v.status}: {v.message}")
    if bad:
        raise PushError(f"{export_dir} failed `bakery verify --engine transformers` ("
                        + "; ".join(f"{v.engine}: {v.message}" for v in bad)
                        + "): not pushing an export that does not reload as baked")
    return verdicts


# ---- token, retries, errors ---------------------------------------------------------------
def resolve_token() -> tuple[str, str]:
    """(token, where it came from). Never print the token itself."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                        "`hf auth login`")
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return token, ("HF_TOKEN" if env == token else "the stored login (`hf auth login`)")


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _network_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = []
    for mod in ("httpx2", "httpx"):
        try:
            m = __import__(mod)
            out += [m.TransportError]
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        out += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(out)


def is_transient(e: BaseException) -> bool:
    """A failure worth retrying: a 5xx/408/429 answer or a dropped connection."""
    status = _status(e)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(e, _network_errors()):
        return True
    return isinstance(e, ConnectionError) and "client error" not in str(e).lower()


def with_retries(what: str, fn: Callable[[], Any], *, retries: int, backoff: float,
                 log: Callable[[str], None], sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call ``fn``; on a transient failure wait ``backoff * 2**attempt`` (at most 60 s) and retry."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_transient(e):
                raise
            delay = min(backoff * 2 ** attempt, 60.0)
            why = f"HTTP {_status(e)}" if _status(e) else type(e).__name__
            log(f"{what}: transient failure ({why}), retry {attempt + 1}/{retries} in {delay:.1f} s")
            sleep(delay)
    raise AssertionError("unreachable")


def _server_message(e: BaseException) -> str:
    msg = getattr(e, "server_message", None)
    if not msg:
        resp = getattr(e, "response", None)
        try:
            msg = resp.headers.get("X-Error-Message") or resp.json().get("error")
        except Exception:
            msg = None
    return str(msg or str(e).splitlines()[0]).strip()


def explain(e: BaseException, *, step: str, repo_id: str, endpoint: str, token_source: str,
            user: str | None = None, revision: str = "main") -> PushError:
    """Turn a client error into a PushError that says what happened and what to do."""
    status, msg = _status(e), _server_message(e)
    if "xet-write-token" in str(e) or "xet" in type(e).__name__.lower():
        return PushError(
            f"{step}: {endpoint} does not speak the Xet storage protocol that huggingface_hub uses "
            "when hf_xet is installed. Set HF_HUB_DISABLE_XET=1 to upload through git-LFS instead.")
    if status == 401:
        return PushError(
            f"{step}: the Hub at {endpoint} rejected the token from {token_source} (401 Unauthorized: "
            f"{msg}). Create a token with write access at {endpoint}/settings/tokens, then set "
            "HF_TOKEN or run `hf auth login --force`.")
    if status == 403:
        ns = repo_id.split("/")[0]
        own = f" Push to your own namespace (--repo {user}/{repo_id.split('/')[1]}) or" if user else ""
        return PushError(
            f"{step}: no permission to write to {repo_id} with the token from {token_source}"
            f"{f' (user {user})' if user else ''} (403 Forbidden: {msg}).{own} ask an admin of "
            f"'{ns}' for write access, or use a token whose scope includes {repo_id}.")
    if status == 409:
        return PushError(
            f"{step}: the Hub reported a conflict for {repo_id}@{revision} (409 Conflict: {msg}). "
            "The name clashes with what is already there (another push in progress, or a path that "
            "exists as a folder/file). Choose another --repo, push to a new --revision, or use "
            "--create-pr.")
    if status == 404:
        return PushError(
            f"{step}: {repo_id} (revision {revision}) was not found at {endpoint} with the token from "
            f"{token_source} (404: {msg}). Check the name, or that the token can see the repo.")
    if status in TRANSIENT_STATUS:
        return PushError(f"{step}: the Hub at {endpoint} kept failing ({status}: {msg}); nothing was "
                         "committed. Try again later.")
    if status is not None:
        return PushError(f"{step}: the Hub at {endpoint} answered {status}: {msg}")
    if isinstance(e, _network_errors()) or isinstance(e, ConnectionError):
        return PushError(f"{step}: cannot reach {endpoint} ({type(e).__name__}: {e}); nothing was "
                         "committed. Check the network or --endpoint.")
    return PushError(f"{step}: {type(e).__name__}: {e}")


# ---- push ---------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    oid: str
    revision: str
    pr_url: str | None = None
    files: list[PlannedFile] = field(default_factory=list)
    changed: bool = True  # False when the Hub already held every file (no new commit)


def prepare(export_dir: str | os.PathLike, *, include: Sequence[str] = (), verify: bool = True,
            log: Callable[[str], None] = print) -> tuple[PushPlan, Manifest, dict[str, Any]]:
    """Every local check before an upload: plan, export, verify, card."""
    plan = plan_upload(export_dir, include)
    manifest = check_export(plan.export_dir)
    if verify:
        log("verify: reloading the export with transformers (skip with --no-verify)...")
        run_verify(plan.export_dir, log=log)
        plan = plan_upload(export_dir, include)  # verify rewrites the card's engines section
    meta = check_card(plan.export_dir, manifest, require_engines=verify)
    return plan, manifest, meta


def push(export_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
         revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
         endpoint: str | None = None, include: Sequence[str] = (), verify: bool = True,
         retries: int = 4, backoff: float = 1.0, log: Callable[[str], None] = print) -> PushResult:
    """Check ``export_dir`` and publish it to ``repo_id`` in one commit. Returns the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    # what can fail without the network fails before the minutes-long verify
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push")
    token, source = resolve_token()
    plan, manifest, _ = prepare(export_dir, include=include, verify=verify, log=log)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    ctx = dict(repo_id=repo_id, endpoint=endpoint, token_source=source, revision=branch)

    def retried(what: str, fn: Callable[[], Any], user: str | None = None) -> Any:
        try:
            return with_retries(what, fn, retries=retries, backoff=backoff, log=log)
        except PushError:
            raise
        except Exception as e:
            if _status(e) is None and not isinstance(e, (ConnectionError, *_network_errors())) \
                    and "xet" not in str(e).lower():
                raise
            raise explain(e, step=what, user=user, **ctx) from None

    who = retried("checking the token", lambda: api.whoami())
    user = who.get("name")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
        ctx["repo_id"] = repo_id
    try:
        validate_repo_id(repo_id)
    except ValueError as e:  # the client's HFValidationError
        raise PushError(f"--repo {repo_id} is not a valid Hub repo id: {e}") from None
    if role == "read":
        raise PushError(f"the token from {source} (user {user}) is read-only: create a token with "
                        f"write access at {endpoint}/settings/tokens and set HF_TOKEN")
    retried("creating the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True), user)
    if branch == "main" and not create_pr:
        info = retried("reading the repo", lambda: api.model_info(repo_id), user)
        check_no_clash(repo_id, [s.rfilename for s in (info.siblings or [])])
    if branch != "main":
        retried(f"creating branch {branch}",
                lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), user)
    message = commit_message or _default_message(manifest)
    card = card_for_repo(plan.export_dir, manifest, repo_id)
    ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=(
        card.encode() if f.path == "README.md" and card is not None else str(f.source)))
        for f in plan.files]
    log(f"uploading {len(ops)} files ({human_size(plan.total_size)}) to {repo_id}@{branch} at {endpoint}...")
    info = retried("committing the files",
                   lambda: api.create_commit(repo_id, ops, commit_message=message,
                                             revision=revision, create_pr=create_pr), user)
    # the client skips the commit when every file is already there, leaving the ops uncommitted
    changed = any(getattr(op, "_is_committed", True) for op in ops)
    return PushResult(repo_id=repo_id, commit_url=info.commit_url, oid=info.oid, revision=branch,
                      pr_url=info.pr_url, files=plan.files, changed=changed)


def check_no_clash(repo_id: str, remote_files: Sequence[str]) -> None:
    """Refuse to commit over a repo that already holds something other than a bakery export."""
    foreign = [f for f in remote_files if f not in (".gitattributes", "README.md")]
    if foreign and "bakery.json" not in remote_files:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PushError(
            f"name clash: {repo_id} already exists and holds a model that is not a bakery export "
            f"({len(foreign)} files: {shown}). Choose another --repo, or propose the bake with "
            "--create-pr or on a new --revision branch.")


def _default_message(manifest: Manifest) -> str:
    terms = ", ".join(f"{t.trait} (layer {t.layer}, coef {t.coef:g})" for t in manifest.terms)
    return f"bakery: {manifest.method} bake of {terms}" if terms else f"bakery: {manifest.method} bake"
