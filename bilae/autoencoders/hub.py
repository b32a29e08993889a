"""Finding published checkpoints (a local folder in the hub layout, or the Hugging Face hub), uploading them.

The reference implementation's layout, kept here so its calls work unchanged:

* hub: repo ``<owner>/<model>-scope`` holds ``<name>/{config.json,model.safetensors}``;
* local: ``<root>/<model>/<name>/...`` with ``root="weights"`` by default;

where ``<model>`` is the lower-cased last part of the LM's name (``Qwen/Qwen3-0.6B-Base`` →
``qwen3-0.6b-base``) and ``<name>`` the published name (:attr:`AutoencoderConfig.name`, such as
``mixed-l18-x16-a20-b0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bilae.autoencoders.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from bilae.autoencoders.config import check_name_part
from bilae.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from bilae.hooks import Harvester

DEFAULT_OWNER = "tdooms"
"""Owner of the published ``<model>-scope`` repos (the reference's author)."""
DEFAULT_ROOT = "weights"
"""Folder of local checkpoints, laid out ``<root>/<model>/<name>``."""


def model_part(model_or_name: object, model_name: str | None = None) -> str:
    """The reference's short model name: ``"Qwen/Qwen3-0.6B-Base"`` → ``"qwen3-0.6b-base"``.

    Args:
        model_or_name: a hub id or path string, or a model object (its ``name_or_path`` is used).
        model_name: overrides what the model calls itself (e.g. a model loaded from a local path).
    """
    name = model_name
    if name is None:
        name = (
            model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "name_or_path", None)
        )
    if not isinstance(name, str) or not name.strip("/"):
        raise UsageError(
            f"cannot tell the model's name from {type(model_or_name).__name__} (no name_or_path); "
            "pass model_name='<name>', e.g. model_name='qwen3-0.6b-base'"
        )
    return check_name_part("model name", name.rstrip("/").lower().split("/")[-1])


def scope_repo(model: str, owner: str = DEFAULT_OWNER) -> str:
    """The hub repo of a model's autoencoders: ``<owner>/<model>-scope``."""
    return f"{check_name_part('hub owner', owner)}/{check_name_part('model name', model)}-scope"


def find_named(
    model: str,
    name: str,
    *,
    hf: bool = False,
    root: str | Path = DEFAULT_ROOT,
    owner: str = DEFAULT_OWNER,
    revision: str | None = None,
) -> Path:
    """The folder of checkpoint ``name`` of ``model``: ``<root>/<model>/<name>``, or downloaded (``hf``)."""
    check_name_part("checkpoint name", name)
    local = Path(root).expanduser() / check_name_part("model name", model) / name
    if hf:
        hint = f"Offline, copy the folder to {local} and load with hf=False."
        return _download(scope_repo(model, owner), name, revision, hint=hint)
    if not local.is_dir():
        raise CheckpointError(
            f"no local autoencoder at {local}; {_listing(local.parent)}. "
            f"Pass hf=True to download it from {scope_repo(model, owner)}, "
            f"or root= the folder holding {model}/{name}"
        )
    return local


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    return f"{folder} holds {names or 'no checkpoints'}"


def resolve_checkpoint(repo_or_dir: str | Path, name: str, *, revision: str | None = None) -> Path:
    """Return a local folder holding ``<name>/config.json`` and ``<name>/model.safetensors``.

    ``repo_or_dir`` is either a local directory laid out like the hub repo (``<dir>/<name>/...``) or a hub repo
    id such as ``tdooms/qwen3-0.6b-base-scope``; downloads go through ``huggingface_hub`` (cached, and pinned to
    ``revision`` when one is given).
    """
    check_name_part("checkpoint name", name)
    local = Path(repo_or_dir).expanduser()
    if local.is_dir():
        folder = local / name
        if not folder.is_dir():
            names = sorted(p.name for p in local.iterdir() if (p / CONFIG_FILE).is_file())
            raise CheckpointError(
                f"no checkpoint named {name!r} in {local}; it holds {names or 'no checkpoints'}"
            )
        return folder
    hint = f"Offline, pass a local directory laid out as <dir>/{name}/{{{CONFIG_FILE},{WEIGHTS_FILE}}}."
    return _download(str(repo_or_dir), name, revision, hint=hint)


def _download(repo: str, name: str, revision: str | None, *, hint: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _check_repo_id(repo)
    paths = []
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths.append(Path(hf_hub_download(repo, f"{name}/{filename}", revision=revision)))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            raise CheckpointError(
                f"could not fetch {name}/{filename} from hub repo {repo!r}"
                f"{f' at revision {revision!r}' if revision else ''}: {_reason(err)}. {hint}"
            ) from None
    return paths[0].parent


def _reason(err: Exception) -> str:
    # Hub errors span several lines and end in a full stop; the CLI shows one line.
    return f"{type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}"


def _check_repo_id(repo: str) -> None:
    if repo.count("/") != 1 or repo.startswith(("/", ".")) or ".." in repo:
        raise CheckpointError(f"{repo!r} is neither a local directory nor a hub repo id like 'owner/name'")


def upload(folder: str | Path, repo_id: str, path_in_repo: str, **options: Any) -> Any:
    """Upload a checkpoint folder to ``<repo_id>/<path_in_repo>/`` through ``huggingface_hub``.

    ``options`` go to ``HfApi.upload_folder`` (``commit_message``, ``revision``, ``token``, ...). Returns its
    commit info; a failure (no network, no permission) is one CheckpointError line.
    """
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    check_name_part("path_in_repo", path_in_repo)
    try:
        return HfApi().upload_folder(
            folder_path=folder, path_in_repo=path_in_repo, repo_id=repo_id, **options
        )
    except (OSError, ValueError) as err:  # HfHubHTTPError and OfflineModeIsEnabled are OSErrors
        raise CheckpointError(
            f"could not upload {path_in_repo} to hub repo {repo_id!r}: {_reason(err)}. "
            "Offline, keep the local folder (coder.save(model, root='weights')) and upload it later"
        ) from None


def harvester_for(model: Any, tokenizer: Any, layer: int, d_model: int) -> Harvester:
    """A harvester of ``model`` at ``layer`` for a coder of width ``d_model`` (``coder.hooked``)."""
    from bilae.hooks import Harvester  # lazily: bilae.hooks is not needed to load weights

    harvester = Harvester(model, tokenizer, layer)
    if harvester.d_model != d_model:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        raise CheckpointError(
            f"the autoencoder has d_model {d_model}, but model {name!r} has d_model {harvester.d_model}; "
            "load a checkpoint trained on this model"
        )
    return harvester
