"""Turn a local folder or a Hugging Face repo id into a local checkpoint folder.

A repo id is resolved with `huggingface_hub.snapshot_download`, fetching only what loading needs: config.json,
hf_quant_config.json and the safetensors index first, then just the shards the index names (or the
safetensors files when there is no index). With HF_HUB_OFFLINE=1 or `local_files_only=True` the cached snapshot is
used; when the id is not in the cache the error says so and where the cache is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

META_FILES = ["config.json", "hf_quant_config.json", "*.safetensors.index.json"]


class CheckpointNotFoundError(FileNotFoundError):
    """A path that does not exist, or a repo id that cannot be resolved (offline or not)."""


def looks_like_path(s: str) -> bool:
    """Paths start with / . ~ or contain a backslash or more than one '/'; repo ids are 'name' or 'org/name'."""
    return s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") > 1 or os.path.exists(s)


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                       local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local folder for `path_or_repo_id`: the folder itself, or the hub snapshot (downloading only the
    config, index and safetensors shards)."""
    s = os.fspath(path_or_repo_id)
    if looks_like_path(s):
        p = Path(s).expanduser()
        if not p.exists():
            raise CheckpointNotFoundError(f"checkpoint folder {p} does not exist")
        if not p.is_dir():
            raise CheckpointNotFoundError(f"{p} is a file; pass the folder holding config.json and the "
                                          f"safetensors files")
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to hub repo ids, not to the local folder {p}")
        return p
    return _snapshot(s, revision, local_files_only, cache_dir)


def _snapshot(repo_id: str, revision: str | None, local_files_only: bool, cache_dir) -> Path:
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = local_files_only or bool(constants.HF_HUB_OFFLINE)
    where = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    rev = f" (revision {revision})" if revision else ""

    def download(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, allow_patterns=patterns,
        ))

    try:
        folder = download(META_FILES)
        if not offline:
            download(_shard_patterns(folder))
    except errors.HFValidationError as e:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid hub repo id: {e}") from None
    except errors.LocalEntryNotFoundError:
        how = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else "the hub could not be reached")
        raise CheckpointNotFoundError(
            f"cannot resolve {repo_id!r}{rev}: {how} and the Hugging Face cache at {where} has no snapshot of it; "
            f"download it once online (e.g. `hf download {repo_id}`) or pass a local folder"
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        raise CheckpointNotFoundError(f"cannot resolve {repo_id!r}{rev} on the hub: {type(e).__name__}: {e}") from None
    if not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(f"{repo_id!r}{rev}: the snapshot at {folder} has no config.json")
    return folder


def _shard_patterns(folder: Path) -> list[str]:
    """The shard files the index names, or every safetensors file when there is no index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = [p for p in indexes if p.name == "model.safetensors.index.json"] or indexes
    if len(preferred) >= 1:
        try:
            weight_map = json.loads(preferred[0].read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            if files:
                return files
        except (OSError, ValueError, AttributeError):
            pass  # a broken index is reported by TensorIndex with its file name
    return ["*.safetensors"]
