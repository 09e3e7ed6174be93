"""``bakery push`` against the real huggingface_hub client talking to a loopback Hub.

The server (tests/hub_server.py) speaks the Hub endpoints the client uses for this; the client is
pointed at it with ``--endpoint`` (or HF_ENDPOINT). ``HF_HUB_DISABLE_XET=1`` makes the client use
git-LFS (basic transfer) rather than Xet, which it would pick on its own whenever hf_xet is
installed, whatever the server says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hub_server import HubServer

from bakery import hub as hubmod
from bakery.io.card_sections import write_section
from bakery.cli import main
from bakery.vectors.artifact import VectorArtifact

# the client itself passes a file object as data= to httpx2, which warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_testALICEwrite0123456789"
READ_TOKEN = "hf_testALICEread0123456789"
REPO = "alice/tiny-pirate"

def make_export(folder: Path, tiny_dir: Path, trait: str = "pirate") -> Path:
    """A real bias bake of a tiny llama (bakery.bakers.bake), plus a compare/ report and the
    fidelity and engines card sections that `bakery compare` and `bakery verify` would add."""
    from bakery.bakers import bake

    base = folder.with_name(folder.name + "-base")
    shutil.copytree(tiny_dir, base)
    # what models.py writes for a converted Hub model: its Hub id and license
    (base / "bakery_source.json").write_text(json.dumps({"hub_id": "tiny/llama", "license": "apache-2.0"}))
    torch.manual_seed(1)
    art = VectorArtifact(torch.randn(5, 32), meta={"trait": trait, "model": "tiny/llama"})
    bake("bias", base, [(art, 2, 4.0, trait)], folder, progress=False)
    (folder / "compare").mkdir()
    (folder / "compare" / "report.json").write_text(json.dumps({"recovered": 0.99}))
    (folder / "compare" / "fidelity.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    write_section(folder, "fidelity", "## Fidelity\n\n| bake | R |\n| --- | --- |\n| bias | 0.99 |")
    write_section(folder, "engines", "| engine | verdict |\n| --- | --- |\n| transformers | ok |")
    return folder


@pytest.fixture
def export(tmp_path, tiny_models) -> Path:
    return make_export(tmp_path / "export", tiny_models("llama"))


@pytest.fixture
def hub_env(tmp_path, monkeypatch, hub):
    """Real client, loopback only: a token in HF_TOKEN, no stored login, LFS instead of Xet, and
    the client's default endpoint (used e.g. for its agent-registry lookup) on the loopback Hub."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents.json"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(tmp_path / "hf_home" / "xet"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # read by hf_xet itself
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf_home" / "xet"))

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    return tmp_path / "hf_home"


@pytest.fixture
def hub():
    with HubServer(tokens={TOKEN: ("alice", "write"), READ_TOKEN: ("alice", "read")},
                   orgs={"alice": ["bakers"]}) as server:
        yield server


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def pushed_files(export: Path, repo: str = REPO) -> dict[str, bytes]:
    """What the Hub must hold: the export's files, the card's usage lines naming the repo."""
    from bakery.io.manifest import Manifest

    files = local_files(export)
    card = hubmod.card_for_repo(export, Manifest.load(export), repo)
    if card is not None:
        files["README.md"] = card.encode()
    return files


# ---- the push itself -----------------------------------------------------------------------
def test_push_arrives_byte_identical_with_auth_and_parsable_card(export, hub, hub_env):
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output

    stored = hub.files(REPO)
    local = local_files(export)
    assert set(stored) == set(local)
    for rel in local:  # every file byte for byte; the card's usage lines name the repo
        if rel != "README.md":
            assert stored[rel] == local[rel], rel
    assert stored == pushed_files(export)
    assert f'from_pretrained("{REPO}")' in stored["README.md"].decode()
    assert f"vllm serve {REPO}" in stored["README.md"].decode()
    assert f'from_pretrained("{export}")' in local["README.md"].decode()  # local card untouched
    commit = hub.repos[REPO].commits[-1]
    assert f"commit: {hub.url}/{REPO}/commit/{commit['oid']}" in res.output
    assert commit["summary"] == "bakery: bias bake of pirate (layer 2, coef 4)"
    assert {"model.safetensors", "bakery.json", "bake.yaml", "vectors/pirate.safetensors"} <= set(stored)

    # the token went in the Authorization header of every Hub API call, and nowhere in the output
    api_calls = [r for r in hub.requests if r.endpoint != "lfs_upload"]
    assert {r.endpoint for r in api_calls} >= {"whoami", "create", "preupload", "lfs_batch", "commit"}
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    assert TOKEN not in res.output

    # weights and vectors went through LFS (basic transfer), not inline in the commit
    for call in hub.calls("lfs_batch"):
        assert "basic" in json.loads(call.body)["transfers"]
    uploaded = {r.path.rsplit("/", 1)[1] for r in hub.calls("lfs_upload")}
    for rel in ("model.safetensors", "vectors/pirate.safetensors", "compare/fidelity.png"):
        assert hashlib.sha256((export / rel).read_bytes()).hexdigest() in uploaded

    # the README that arrived parses as a model card with the metadata the Hub needs
    from huggingface_hub import ModelCard

    meta = ModelCard(stored["README.md"].decode()).data.to_dict()
    assert meta["base_model"] == "tiny/llama" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"bakery", "steering", "trait:pirate"} <= set(meta["tags"])
    body = stored["README.md"].decode()
    for needed in ("from_pretrained", "vllm serve", "sglang", "## Reproduce", "bakery bake",
                   "<!-- bakery:fidelity -->", "<!-- bakery:engines -->"):
        assert needed in body


def test_hf_endpoint_and_hf_token_from_environment_in_a_real_process(export, hub, tmp_path):
    """The installed `bakery` command, configured only by environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="127.0.0.1")
    exe = Path(sys.executable).with_name("bakery")
    proc = subprocess.run([str(exe), "push", str(export), "--repo", "tiny-pirate", "--no-verify"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert hub.files(REPO) == pushed_files(export)  # NAME alone went to the token owner's namespace
    assert f"{hub.url}/{REPO}/commit/" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert not (tmp_path / "hf_home" / "token").exists()  # the token was not stored anywhere


def test_stored_login_is_used_when_hf_token_is_unset(export, hub, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    hub_env.mkdir()
    (hub_env / "token").write_text(TOKEN)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output
    assert hub.calls("commit")[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_no_token_at_all_is_a_clear_error_before_the_verify(export, hub, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url)
    assert res.exit_code == 2
    assert "no Hugging Face token" in res.output and "hf auth login" in res.output
    assert "verify:" not in res.output  # refused at once, not after minutes of verifying
    assert hub.requests == []


def test_branch_pull_request_and_message(export, hub, hub_env):
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify",
                  "--revision", "v1", "--commit-message", "first bake", "--private")
    assert res.exit_code == 0, res.output
    assert hub.repos[REPO].private
    assert hub.files(REPO, "v1") == pushed_files(export) and hub.files(REPO, "main") == {}
    assert hub.repos[REPO].commits[-1]["summary"] == "first bake"

    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify",
                  "--create-pr")
    assert res.exit_code == 0, res.output
    assert f"pull request: {hub.url}/{REPO}/discussions/1" in res.output
    assert hub.files(REPO, "refs/pr/1") == pushed_files(export) and hub.files(REPO, "main") == {}


def test_pushing_again_uploads_only_what_changed(export, hub, hub_env):
    assert run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify").exit_code == 0
    first_uploads = len(hub.calls("lfs_upload"))
    write_section(export, "fidelity", "| bake | R |\n| --- | --- |\n| bias | 0.98 |")
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output
    assert len(hub.calls("lfs_upload")) == first_uploads  # weights not sent twice
    assert hub.files(REPO) == pushed_files(export)
    assert len(hub.repos[REPO].commits) == 2

    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output
    assert "nothing to push" in res.output and len(hub.repos[REPO].commits) == 2


# ---- failures ------------------------------------------------------------------------------
def test_rejected_token_401(export, hub, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_revokedTOKEN000")
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert "rejected the token from HF_TOKEN (401" in res.output
    assert "settings/tokens" in res.output
    assert "hf_revokedTOKEN000" not in res.output
    assert REPO not in hub.repos


def test_401_in_the_middle_of_a_push_commits_nothing(export, hub, hub_env):
    hub.fail("preupload", 401)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2 and "rejected the token" in res.output
    assert hub.repos[REPO].commits == []


def test_read_only_token_is_refused_before_anything_is_created(export, hub, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2 and "read-only" in res.output
    assert hub.calls("create") == []


def test_no_permission_403(export, hub, hub_env):
    res = run_cli("push", str(export), "--repo", "bob/tiny-pirate", "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert "no permission to write to bob/tiny-pirate" in res.output and "403" in res.output
    assert "--repo alice/tiny-pirate" in res.output
    # an organisation the user belongs to is fine
    res = run_cli("push", str(export), "--repo", "bakers/tiny-pirate", "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output


def test_existing_bakery_repo_409_on_create_is_fine_and_keeps_other_files(export, hub, hub_env):
    hub.add_repo(REPO, files={"notes.txt": b"keep me", "bakery.json": b"{}"})
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output
    assert hub.calls("create")[0].status == 409
    assert hub.files(REPO) == {"notes.txt": b"keep me", **pushed_files(export)}


def test_name_clash_with_a_foreign_model_is_refused(export, hub, hub_env):
    theirs = {".gitattributes": b"*.bin filter=lfs", "config.json": b"{}", "pytorch_model.bin": b"w"}
    hub.add_repo(REPO, files=theirs)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert "name clash: alice/tiny-pirate already exists" in res.output
    assert "config.json, pytorch_model.bin" in res.output
    assert hub.calls("create")[0].status == 409 and hub.calls("commit") == []
    assert hub.files(REPO) == theirs
    # proposing it as a pull request leaves their main branch alone
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify", "--create-pr")
    assert res.exit_code == 0, res.output
    assert hub.files(REPO) == theirs and hub.files(REPO, "refs/pr/1") == {**theirs, **pushed_files(export)}


def test_conflict_409_on_commit_is_a_clear_error(export, hub, hub_env):
    hub.fail("commit", 409, message="A file with this name already exists as a folder")
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert "409 Conflict: A file with this name already exists as a folder" in res.output
    assert "--create-pr" in res.output
    assert len(hub.calls("commit")) == 1  # a conflict is not retried
    assert hub.repos[REPO].commits == []


def test_503_then_200_is_retried(export, hub, hub_env):
    hub.fail("create", 503)
    hub.fail("commit", 503)
    logs: list[str] = []
    result = hubmod.push(export, REPO, endpoint=hub.url, verify=False, backoff=0.01, log=logs.append)
    assert [c.status for c in hub.calls("commit")] == [503, 200]
    assert [c.status for c in hub.calls("create")] == [503, 200]
    assert sum("transient failure (HTTP 503)" in line for line in logs) == 2
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].commits[0]['oid']}"
    assert hub.files(REPO) == pushed_files(export)
    assert len(hub.calls("lfs_upload")) == 3  # LFS blobs were not sent again on the retry


def test_503_forever_gives_up_with_nothing_committed(export, hub, hub_env):
    hub.fail("commit", 503, times=10)
    with pytest.raises(hubmod.PushError, match="kept failing.*nothing was committed"):
        hubmod.push(export, REPO, endpoint=hub.url, verify=False, retries=2, backoff=0.01,
                    log=lambda _: None)
    assert len(hub.calls("commit")) == 3 and hub.repos[REPO].commits == []


def test_hf_hub_offline_is_reported(export, hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output
    assert hub.requests == []


def test_xet_without_a_xet_server_says_how_to_fall_back(export, hub, hub_env, monkeypatch):
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify",
                  "--retries", "0")
    assert res.exit_code == 2 and "HF_HUB_DISABLE_XET=1" in res.output
    assert hub.repos[REPO].commits == []


# ---- checks before upload ------------------------------------------------------------------
def test_stray_files_are_refused_unless_included(export, hub, hub_env):
    (export / "checkpoint-10").mkdir()
    (export / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 2048)
    (export / "__pycache__").mkdir()
    (export / "__pycache__" / "x.pyc").write_bytes(b"y")
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert "checkpoint-10/optimizer.pt (2.0 KiB)" in res.output and "__pycache__/x.pyc" in res.output
    assert "--include" in res.output and hub.requests == []

    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify",
                  "--include", "checkpoint-10/*")
    assert res.exit_code == 2 and "__pycache__/x.pyc" in res.output
    assert "checkpoint-10/optimizer.pt" not in res.output

    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify",
                  "--include", "checkpoint-10", "--include", "__pycache__/*")
    assert res.exit_code == 0, res.output
    assert hub.files(REPO)["checkpoint-10/optimizer.pt"] == b"x" * 2048


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("- trait:pirate\n", ""), "`tags` lacks pirate"),
    (lambda t: t.replace("- bakery\n", "").replace("- steering\n", ""), "`tags` lacks bakery, steering"),
    (lambda t: t.replace("license: apache-2.0", "license: mit"),
     "`license` is 'mit' but the base model is licensed 'apache-2.0'"),
    (lambda t: t.replace("base_model: tiny/llama\n", ""), "`base_model` is missing"),
    (lambda t: t.replace("base_model_relation: finetune", "base_model_relation: baked"),
     "`base_model_relation` is 'baked'"),
    (lambda t: t.replace("library_name: transformers\n", ""), "`library_name` is missing"),
    (lambda t: t.replace("tags:\n", "tags: [\n"), "does not parse as a Hugging Face model card"),
    (lambda t: t.replace("<!-- bakery:fidelity -->", "").replace("<!-- /bakery:fidelity -->", ""),
     "no fidelity section"),
])
def test_card_problems_are_refused(export, hub, hub_env, edit, message):
    card = export / "README.md"
    card.write_text(edit(card.read_text()))
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 2
    assert message in res.output
    assert hub.requests == []


def test_missing_card_and_manifest(export):
    (export / "README.md").unlink()
    with pytest.raises(hubmod.CardError, match="has no model card"):
        hubmod.prepare(export, verify=False)
    (export / "bakery.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a bakery export"):
        hubmod.prepare(export, verify=False)


def test_altered_vector_or_missing_shard_is_refused(export):
    VectorArtifact(torch.zeros(5, 32) + 1, meta={"trait": "pirate"}).save(export / "vectors" / "pirate.safetensors")
    with pytest.raises(ValueError, match="does not match the sha256 in bakery.json"):
        hubmod.check_export(export)
    (export / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        hubmod.check_export(export)


def test_push_runs_real_verify_and_ships_its_verdicts(export, hub, hub_env):
    pytest.importorskip("bakery.engines.verify")
    logs: list[str] = []
    hubmod.push(export, REPO, endpoint=hub.url, backoff=0.01, log=logs.append)
    assert any(line.startswith("verify transformers: pass") for line in logs), logs
    stored = hub.files(REPO)
    assert stored == pushed_files(export)
    assert "compare/verify.json" in stored
    assert json.loads(stored["compare/verify.json"])["transformers"]["status"] == "pass"
    card = stored["README.md"].decode()
    assert "## Engine verification" in card and "by `bakery verify`" in card


def test_export_that_fails_verify_is_not_pushed(export, hub, hub_env):
    pytest.importorskip("bakery.engines.verify")
    manifest = json.loads((export / "bakery.json").read_text())
    manifest["terms"][0]["coef"] = -4.0  # the weights carry +4: no longer what the manifest says
    (export / "bakery.json").write_text(json.dumps(manifest))
    with pytest.raises(hubmod.PushError, match="failed `bakery verify --engine transformers`"):
        hubmod.push(export, REPO, endpoint=hub.url, log=lambda _: None)
    assert hub.requests == []


def test_dry_run_lists_files_with_sizes_and_sends_nothing(export, hub, hub_env):
    res = run_cli("push", str(export), "--repo", REPO, "--endpoint", hub.url, "--dry-run")
    assert res.exit_code == 0, res.output
    files = local_files(export)
    for rel, data in files.items():
        line = next(line for line in res.output.splitlines() if line.strip().startswith(rel + " "))
        assert hubmod.human_size(len(data)) in line
    assert f"would push {len(files)} files" in res.output
    assert "base_model tiny/llama (finetune)" in res.output
    assert hub.requests == []


def test_retry_helper_does_not_retry_client_errors():
    calls = []

    class Resp:
        def __init__(self, code):
            self.status_code = code

    class Err(Exception):
        def __init__(self, code):
            self.response = Resp(code)

    def fail(code):
        calls.append(code)
        raise Err(code)

    with pytest.raises(Err):
        hubmod.with_retries("x", lambda: fail(400), retries=3, backoff=0, log=lambda _: None)
    assert calls == [400]
    waits: list[float] = []
    with pytest.raises(Err):
        hubmod.with_retries("x", lambda: fail(502), retries=3, backoff=0.5, log=lambda _: None,
                            sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0]


def test_bake_of_a_local_model_without_hub_id_needs_a_base_model(tmp_path, tiny_models):
    """A bake from a plain local folder has no Hub id to name as base_model: push says so."""
    from bakery.bakers import bake

    torch.manual_seed(1)
    art = VectorArtifact(torch.randn(5, 32), meta={"trait": "pirate"})
    out = bake("bias", tiny_models("llama"), [(art, 2, 4.0, "pirate")], tmp_path / "local", progress=False)
    with pytest.raises(hubmod.CardError, match="`base_model` is missing"):
        hubmod.prepare(out, verify=False)


@pytest.mark.slow
def test_push_a_bake_of_the_embedded_model(tmp_path, smol_dir, hub, hub_env):
    """A 270 MB bias bake of SmolLM2 goes through LFS and arrives byte-identical."""
    from bakery.bakers import bake
    from bakery.models import read_config

    cfg = read_config(smol_dir)
    torch.manual_seed(0)
    art = VectorArtifact(torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"]) * 0.1,
                         meta={"trait": "pirate"})
    out = bake("bias", smol_dir, [(art, 16, 2.0, "pirate")], tmp_path / "smol-pirate", progress=False)
    res = run_cli("push", str(out), "--repo", "alice/smol-pirate", "--endpoint", hub.url, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "base_model HuggingFaceTB/SmolLM2-135M-Instruct (finetune)" in res.output
    res = run_cli("push", str(out), "--repo", "alice/smol-pirate", "--endpoint", hub.url, "--no-verify")
    assert res.exit_code == 0, res.output
    stored = hub.files("alice/smol-pirate")
    expected = pushed_files(out, "alice/smol-pirate")
    assert set(stored) == set(expected)
    for rel, data in expected.items():
        assert hashlib.sha256(stored[rel]).digest() == hashlib.sha256(data).digest(), rel
    assert len(stored["model.safetensors"]) > 200_000_000
