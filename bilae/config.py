"""Where bilae's Hydra configs live, and composing them from Python (tests, notebooks, bilae-analyze)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
