"""``bilae-cache``: harvest a frozen LM's activations once into an on-disk cache, then train from it.

    bilae-cache cache.dir=caches/minilm-l3                               # the demo model and corpus
    bilae-train data=cache data.dir=caches/minilm-l3 buffer_tokens=0     # no LM is loaded
    bilae-train -m data=cache data.dir=caches/minilm-l3 autoencoder.alpha=0,0.1,0.2   # a sweep reuses it

Writing: :mod:`bilae.cache_writer`; reading and the training data module: :mod:`bilae.cache_reader`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bilae.cache_writer import build_cache
from bilae.cli import reported
from bilae.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache")
def _main(cfg: DictConfig) -> None:
    with reported("bilae-cache"):
        build_cache(cfg)


def main() -> None:
    """Console script ``bilae-cache``."""
    with reported("bilae-cache"):
        _main()


if __name__ == "__main__":
    main()
