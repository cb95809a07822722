"""Hugging Face hub model ids (`org/name[@revision]`) wherever a model directory is accepted.

`model_dir(spec)` is the one place a hub id becomes a directory: an existing local path is returned
as is; otherwise an `org/name[@revision]` id resolves through huggingface_hub to its snapshot in the
local cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). It downloads only
when HF_HUB_OFFLINE is unset and the hub answers; offline and not cached is one UsageError line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlvrx.errors import UsageError

__all__ = ["hub_cache_dir", "hub_offline", "model_dir", "parse_hub_id"]

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9._/-]+))?")
# What a causal LM checkpoint needs (weights, config, tokenizer, chat template), not .bin/.pt/.gguf duplicates.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` reads as org/name[@revision], else None."""
    match = _HUB_ID.fullmatch(str(text))
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/ON/YES/TRUE), read now rather than at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def model_dir(spec: str | os.PathLike) -> Path:
    """A model argument -> a directory: an existing path unchanged, a hub id its cached snapshot
    (downloaded first when online), anything else unchanged (the caller reports a missing directory)."""
    path = Path(spec).expanduser()
    parsed = None if path.exists() else parse_hub_id(str(spec))
    if parsed is None:
        return path
    repo, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise UsageError(f"{spec}: no such local directory, and hub model {spec} is not in the cache {cache} ({why})") from None
    except Exception as exc:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{spec}: no such local directory, and the hub did not provide it ({first})") from None
