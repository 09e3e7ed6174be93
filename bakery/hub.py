"""Publish an export folder to the Hugging Face Hub (``bakery push``).

Steps: plan the upload (the files of a bakery export, refusing stray files such as checkpoints and
caches unless ``include`` lets them through), check the folder (manifest, weights, vector
checksums) and its model card (parses with ``huggingface_hub.ModelCard``, carries ``base_model``,
``base_model_relation``, ``library_name``, the tags and the base's license), run ``bakery verify
--engine transformers``, then ``create_repo(exist_ok=True)`` and one ``create_commit`` with every
file, so the repo never holds half a push. Transient Hub failures are retried with backoff; a
rejected token (401), a missing permission (403) and a conflict (409) become one clear error.

The token comes from ``HF_TOKEN`` or the client's stored login. It is handed to the client and
never printed, logged or written.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bakery.io.card_sections import read_section
from bakery.io.manifest import Manifest, ManifestError

# Paths (relative, posix) that make up a bakery export (DESIGN.md, "An exported folder").
EXPORT_PATTERNS = (
    "config.json", "generation_config.json", "README.md", "bakery.json", "bake.yaml",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "LICENSE", "LICENSE.*", "LICENSE-*", "NOTICE", "USE_POLICY.md", ".gitattributes",
    "vectors/*.safetensors",
    "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
    "compare/*.json", "compare/*.md", "compare/*.png", "compare/*.csv",
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REQUIRED_TAGS = ("bakery", "steering")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class PushError(RuntimeError):
    """The Hub refused or failed the push; the message says why and what to do."""


class StrayFiles(ValueError):
    """The export folder holds files that are not part of an export."""


class CardError(ValueError):
    """The model card is missing, does not parse, or lacks required metadata."""


# ---- plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative, posix: the path in the repo
    size: int
    source: Path
    included: bool = False  # let through by --include rather than recognised as export content


@dataclass
class PushPlan:
    export_dir: Path
    files: list[PlannedFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def table(self) -> str:
        """One line per file with its size, then the total."""
        width = max([len(f.path) for f in self.files] + [5])
        lines = [f"  {f.path:<{width}}  {human_size(f.size):>10}"
                 + ("  (--include)" if f.included else "") for f in self.files]
        lines.append(f"  {'total':<{width}}  {human_size(self.total_size):>10}  "
                     f"({len(self.files)} files)")
        return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip("/") + "/*")
               for p in patterns)


def plan_upload(export_dir: str | os.PathLike, include: Sequence[str] = ()) -> PushPlan:
    """The files to upload, sorted. Files that are not export content (checkpoints, caches,
    temporary files) are refused with StrayFiles unless a glob in ``include`` matches them."""
    root = Path(export_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the export folder written by `bakery bake`")
    files, stray = [], []
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() and not p.exists():
            stray.append((rel, "broken link"))
            continue
        known = _matches(rel, EXPORT_PATTERNS) and not any(part.startswith(".") for part in
                                                            rel.split("/")[:-1])
        if known or _matches(rel, include):
            files.append(PlannedFile(rel, p.stat().st_size, p, included=not known))
        else:
            stray.append((rel, human_size(p.stat().st_size)))
    if stray:
        shown = "\n".join(f"  {rel} ({why})" for rel, why in stray[:20])
        more = f"\n  ... and {len(stray) - 20} more" if len(stray) > 20 else ""
        raise StrayFiles(
            f"refusing to push {root}: {len(stray)} file(s) are not part of a bakery export "
            f"(checkpoints, caches, temporary files?):\n{shown}{more}\n"
            "Remove them, or name them with --include 'GLOB' (repeatable) to push them anyway."
        )
    if not files:
        raise FileNotFoundError(f"{root} is empty: nothing to push")
    return PushPlan(root, files)


# ---- checks -------------------------------------------------------------------------------
def check_export(export_dir: str | os.PathLike) -> Manifest:
    """The manifest, weights and vector artifacts are present and the vectors match their
    checksums in the manifest. Returns the manifest."""
    root = Path(export_dir)
    try:
        manifest = Manifest.load(root)
    except ManifestError as e:
        raise ManifestError(f"{e}; `bakery push` publishes export folders only") from e
    problems = []
    if not (root / "config.json").is_file():
        problems.append("config.json is missing")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [f"{s} (named in {index.name}) is missing" for s in sorted(shards)
                     if not (root / s).is_file()]
    elif not (root / "model.safetensors").is_file():
        problems.append("no weights: neither model.safetensors nor model.safetensors.index.json")
    for term in manifest.terms:
        vf = root / term.vector_file
        if not vf.is_file():
            problems.append(f"{term.vector_file} (the vector of trait '{term.trait}') is missing")
            continue
        from bakery.vectors.artifact import load_vector

        sha = load_vector(vf).sha256()
        if term.vector_sha256 and sha != term.vector_sha256:
            problems.append(f"{term.vector_file} does not match the sha256 in bakery.json "
                            f"({sha[:12]}... vs {term.vector_sha256[:12]}...): it was changed after the bake")
    if problems:
        raise ValueError(f"{root} is not a complete bakery export: " + "; ".join(problems)
                         + ". Bake it again with `bakery bake`.")
    return manifest


def base_license(manifest: Manifest) -> str | None:
    """The license of the base model, from the manifest or the source folder when known."""
    src = manifest.source or {}
    if src.get("license"):
        return str(src["license"])
    path = src.get("path")
    if not path or not Path(path).is_dir():
        return None
    side = Path(path) / "bakery_source.json"  # written by models.py for built-in aliases
    if side.is_file():
        lic = json.loads(side.read_text()).get("license")
        if lic:
            return str(lic)
    readme = Path(path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard(readme.read_text(), ignore_metadata_errors=True).data.to_dict().get("license")
        except Exception:  # an unreadable base card only means we cannot compare
            return None
        return str(lic) if lic else None
    return None


def check_card(export_dir: str | os.PathLike, manifest: Manifest, *,
               require_engines: bool = False) -> dict[str, Any]:
    """Parse README.md with ``huggingface_hub.ModelCard`` and check what the Hub and users need.

    Returns the card metadata. Raises CardError naming every problem at once."""
    from huggingface_hub import ModelCard

    root = Path(export_dir)
    path = root / "README.md"
    if not path.is_file():
        raise CardError(f"{root} has no model card (README.md): bake it again with `bakery bake`")
    text = path.read_text()
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:  # the client raises ValueError for bad YAML or metadata
        raise CardError(f"{path} does not parse as a Hugging Face model card: {e}") from e
    meta = card.data.to_dict()
    problems = []
    base = meta.get("base_model")
    if not base or not (isinstance(base, str) or (isinstance(base, list) and all(base))):
        problems.append("`base_model` is missing (the Hub id of the model this was baked from)")
    rel = meta.get("base_model_relation")
    if rel not in BASE_MODEL_RELATIONS:
        problems.append(f"`base_model_relation` is {rel!r}; expected one of {', '.join(BASE_MODEL_RELATIONS)}")
    if not meta.get("library_name"):
        problems.append("`library_name` is missing (transformers, or peft for an adapter)")
    tags = meta.get("tags") or []
    if not isinstance(tags, list):
        tags = [tags]
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    # the trait may be tagged bare ("pirate") or namespaced ("trait:pirate", as card.py writes it)
    missing += [t for t in sorted({t.trait for t in manifest.terms})
                if t not in tags and f"trait:{t}" not in tags]
    if missing:
        problems.append(f"`tags` lacks {', '.join(missing)}")
    lic = meta.get("license")
    if not lic:
        problems.append("`license` is missing (the base model's license carries over)")
    else:
        base_lic = base_license(manifest)
        if base_lic and str(lic).lower() != base_lic.lower():
            problems.append(f"`license` is {lic!r} but the base model is licensed {base_lic!r}")
    if (root / "compare" / "report.json").is_file() and read_section(text, "fidelity") is None:
        problems.append("compare/ holds a fidelity report but the card has no fidelity section: "
                        "run `bakery compare` on the folder again")
    if require_engines and read_section(text, "engines") is None:
        problems.append("the card has no engine verdicts section: run `bakery verify` on the folder")
    if problems:
        raise CardError(f"the model card {path} is not ready to publish:\n  - "
                        + "\n  - ".join(problems))
    return meta


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


def card_for_repo(export_dir: str | os.PathLike, manifest: Manifest, repo_id: str) -> str | None:
    """The card text to upload: the baker's section re-rendered so that its usage lines
    (from_pretrained, vllm serve, sglang) name ``repo_id`` rather than the local folder. None when
    the card has no such section (nothing to change). The local README.md is left as it is."""
    from bakery.io.card import SECTION, body
    from bakery.io.card_sections import set_section

    text = (Path(export_dir) / "README.md").read_text()
    if read_section(text, SECTION) is None:
        return None
    new = set_section(text, SECTION, body(manifest, repo_id))
    return None if new == text else new


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
    validate_repo_id(repo_id)
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
