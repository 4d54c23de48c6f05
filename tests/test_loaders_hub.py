"""Resolving a checkpoint: local folders pass through, hub ids come from the cache offline, and a repo id that is
not cached gives an error that says so (no network is used: every hub call here is local_files_only)."""

import pytest

from moequant.loaders.hub import CheckpointNotFoundError, looks_like_path, resolve_checkpoint


def _fake_cache(root, repo="org/tiny", commit="a" * 40):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return snap


def test_local_folder_passes_through(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="checkpoint folder .*nope does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(tmp_path / "file.safetensors")
    with pytest.raises(ValueError, match="revision='main' only applies to hub repo ids"):
        resolve_checkpoint(tmp_path, "main")


def test_path_or_repo_id():
    assert looks_like_path("/abs/dir") and looks_like_path("./rel") and looks_like_path("~/x") and looks_like_path("a/b/c")
    assert not looks_like_path("org/name") and not looks_like_path("gpt2")


def test_offline_cache_hit(tmp_path):
    snap = _fake_cache(tmp_path)
    assert resolve_checkpoint("org/tiny", cache_dir=tmp_path, local_files_only=True) == snap


def test_offline_cache_miss_names_repo_and_cache(tmp_path):
    _fake_cache(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="cannot resolve 'org/other': offline mode is on .* "
                                                      "Hugging Face cache at .* has no snapshot"):
        resolve_checkpoint("org/other", cache_dir=tmp_path, local_files_only=True)
    # a revision that was never downloaded is a miss as well
    with pytest.raises(CheckpointNotFoundError, match="'org/tiny' \\(revision v2\\)"):
        resolve_checkpoint("org/tiny", "v2", cache_dir=tmp_path, local_files_only=True)


def test_snapshot_without_config(tmp_path):
    snap = _fake_cache(tmp_path)
    (snap / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        resolve_checkpoint("org/tiny", cache_dir=tmp_path, local_files_only=True)


def test_invalid_repo_id(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="neither an existing folder nor a valid hub repo id"):
        resolve_checkpoint("bad id with spaces", cache_dir=tmp_path, local_files_only=True)
