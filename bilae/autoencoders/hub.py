"""Finding published checkpoints: a local folder in the hub layout, or the Hugging Face hub itself."""

from __future__ import annotations

from pathlib import Path

from bilae.autoencoders.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from bilae.errors import CheckpointError


def resolve_checkpoint(repo_or_dir: str | Path, name: str, *, revision: str | None = None) -> Path:
    """Return a local folder holding ``<name>/config.json`` and ``<name>/model.safetensors``.

    ``repo_or_dir`` is either a local directory laid out like the hub repo (``<dir>/<name>/...``) or a hub repo
    id such as ``tdooms/qwen3-0.6b-base-scope``; downloads go through ``huggingface_hub`` (cached, and pinned to
    ``revision`` when one is given).
    """
    local = Path(repo_or_dir).expanduser()
    if local.is_dir():
        folder = local / name
        if not folder.is_dir():
            names = sorted(p.name for p in local.iterdir() if (p / CONFIG_FILE).is_file())
            raise CheckpointError(
                f"no checkpoint named {name!r} in {local}; it holds {names or 'no checkpoints'}"
            )
        return folder
    return _download(str(repo_or_dir), name, revision)


def _download(repo: str, name: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if repo.count("/") != 1 or repo.startswith(("/", ".")):
        raise CheckpointError(f"{repo!r} is neither a local directory nor a hub repo id like 'owner/name'")
    paths = []
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths.append(Path(hf_hub_download(repo, f"{name}/{filename}", revision=revision)))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            raise CheckpointError(
                f"could not fetch {name}/{filename} from hub repo {repo!r}"
                f"{f' at revision {revision!r}' if revision else ''}: {type(err).__name__}: {err}. "
                f"Offline, pass a local directory laid out as <dir>/{name}/{{{CONFIG_FILE},{WEIGHTS_FILE}}}."
            ) from None
    return paths[0].parent
