"""Where bilae's Hydra configs live, and composing them from Python (tests, notebooks, bilae-analyze).

The configs' source is the top-level ``conf/`` of the repository; a wheel ships the same files as ``bilae/conf``
(``pyproject.toml`` maps one onto the other), so an installed bilae finds them beside its modules and a source
checkout (or an editable install) finds them beside the package.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

_PACKAGE = Path(__file__).resolve().parent


def find_conf_dir(package: Path = _PACKAGE) -> Path:
    """``<package>/conf`` when installed from a wheel, else the checkout's ``conf/`` beside the package."""
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"bilae's configs are missing: neither {package / 'conf'} nor {package.parent / 'conf'} holds train.yaml; "
        "reinstall bilae (pip install bilae, or pip install -e . in a checkout)"
    )


CONF_DIR = find_conf_dir()


def group_options(group: str, chosen: str | None = None) -> str:
    """The options of config group ``group``, comma-separated, the one in use marked ``*`` (for ``--help``)."""
    names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return ", ".join(f"{n}*" if n == chosen else n for n in names)


OmegaConf.register_new_resolver("bilae.options", group_options, replace=True)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config like the command line would, without running anything.

    ``${hydra:...}`` interpolations resolve because the Hydra config is composed too (``return_hydra_config``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)
