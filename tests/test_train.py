"""Training: config composition, a real short run, resume, sweeps and clear errors (tiny Qwen3, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bilae import Autoencoder, AutoencoderConfig, UsageError
from bilae import builders as B
from bilae import train as T
from bilae.config import CONF_DIR, compose
from tests.support.configs import train_cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# -------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize(
    "group",
    [
        "model",
        "data",
        "autoencoder",
        "optimizer",
        "trainer",
        "logger",
        "callbacks",
        "analysis",
        "debug",
        "experiment",
    ],
)
def test_every_option_composes_and_instantiates(group: str, tmp_path: Path) -> None:
    assert options(group), group
    for option in options(group):
        cfg = compose("train", [f"{group}={option}", f"paths.output_dir={tmp_path}"])
        # Everything that needs no download is instantiated for real.
        assert cfg.autoencoder.kind in Autoencoder.kinds
        if cfg.trainer.accelerator in ("cpu", "auto") and cfg.trainer.get("strategy") is None:
            trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
            assert trainer.max_steps == cfg.steps
        for logger in (cfg.logger or {}).values():
            assert instantiate(logger) is not None
        for callback in (cfg.callbacks or {}).values():
            assert instantiate(callback) is not None
        coder = B.build_coder(cfg, d_model=16)
        assert coder.config.layer == cfg.model.layer


def test_paper_experiment_composes_to_the_paper_setup(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=paper-qwen3-l18", f"paths.output_dir={tmp_path}"])
    assert cfg.model.name == "qwen3-0.6b-base" and cfg.model.layer == 18 and cfg.model.dtype == "bfloat16"
    assert cfg.data.source == "fineweb-edu" and cfg.data.n_ctx == 256 and cfg.data.batch_size == 32
    assert (cfg.autoencoder.kind, cfg.autoencoder.expansion, cfg.autoencoder.bottleneck) == ("mixed", 16, 2)
    assert cfg.autoencoder.alpha == 0.2 and cfg.steps == 1024
    assert cfg.optimizer.name == "muon" and cfg.optimizer.lr == 0.03 and cfg.optimizer.decay
    assert cfg.trainer.precision == "bf16-mixed"
    options = OmegaConf.to_container(cfg.autoencoder)
    config = AutoencoderConfig(
        d_model=1024, layer=cfg.model.layer, **options
    )  # building it would take a while
    assert (
        config.name == "mixed-l18-x16-a20-b0" and config.d_features == 16384 and config.d_bottleneck == 2048
    )


def test_qwen3_base_goes_to_the_hub_with_its_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real Qwen3-0.6B path is real code: it asks transformers for the hub id (here answered offline)."""
    import transformers

    asked: list[str] = []

    def fake(name: str, **kwargs: object) -> object:
        asked.append(name)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    cfg = compose("train", ["model=qwen3-0.6b-base", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UsageError):
        B.build_harvester(cfg.model)
    assert asked and asked[0] == "Qwen/Qwen3-0.6B-Base"


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_short_run_lowers_val_mse(tmp_path: Path) -> None:
    cfg = train_cfg(
        tmp_path,
        "steps=100",
        "trainer.val_check_interval=100",
        "optimizer.lr=0.05",
        "autoencoder.expansion=4",
    )
    module, datamodule, trainer = B.build(cfg)
    initial = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mse"]
    trainer.fit(module, datamodule=datamodule)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mse"]
    assert final <= 0.7 * initial, (initial, final)


@pytest.mark.slow
def test_run_exports_and_writes_metrics(tmp_path: Path) -> None:
    cfg = train_cfg(
        tmp_path,
        "steps=8",
        "trainer.val_check_interval=4",
        "callbacks=default",
        "callbacks.checkpoint.every_n_train_steps=4",
    )
    metrics = T.run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"train/mse", "val/mse", "val/density"} <= set(saved)
    folder = tmp_path / "autoencoder" / "mixed-l02-x2-a10-b0"
    coder = Autoencoder.load(folder)
    assert coder.config.d_model == 64 and coder.config.layer == 2
    assert (tmp_path / "autoencoder-best" / "mixed-l02-x2-a10-b0" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    common = [
        "steps=12",
        "trainer.val_check_interval=100",
        "callbacks=default",
        "callbacks.checkpoint.every_n_train_steps=5",
    ]
    full = train_cfg(tmp_path / "full", *common)
    module_full, dm, trainer = B.build(full)
    trainer.fit(module_full, datamodule=dm)

    part = train_cfg(tmp_path / "part", *common, "trainer.max_steps=5")
    module, dm, trainer = B.build(part)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5

    resumed = train_cfg(tmp_path / "part", *common, "ckpt_path=last")
    module_resumed, dm, trainer = B.build(resumed)
    trainer.fit(module_resumed, datamodule=dm, ckpt_path=B.resolve_ckpt_path(resumed, tmp_path / "part"))
    assert trainer.global_step == 12
    for name, tensor in module_full.coder.state_dict().items():
        torch.testing.assert_close(
            module_resumed.coder.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name
        )


# ------------------------------------------------------------------------------------------------ bad input
def test_layer_out_of_range(tmp_path: Path) -> None:
    cfg = train_cfg(tmp_path, "model.layer=9")
    with pytest.raises(UsageError, match=r"layer 9.*0\.\.3"):
        B.build_harvester(cfg.model)


def test_unknown_model(tmp_path: Path) -> None:
    cfg = train_cfg(tmp_path, "model.name=gpt-17")
    with pytest.raises(UsageError, match=r"gpt-17.*minilm"):
        B.build_harvester(cfg.model)


def test_unknown_data_source(tmp_path: Path) -> None:
    cfg = train_cfg(tmp_path, "data.source=wikipedia")
    with pytest.raises(UsageError, match=r"unknown text source 'wikipedia'.*'pydoc'"):
        B.build_datamodule(cfg, tokenizer=None)


def test_n_ctx_must_be_positive(tmp_path: Path) -> None:
    cfg = train_cfg(tmp_path, "data.n_ctx=0")
    with pytest.raises(UsageError, match=r"n_ctx.*0"):
        B.build_datamodule(cfg, tokenizer=None)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    cfg = train_cfg(tmp_path, "data=files", f"data.source_kwargs.paths={tmp_path}/empty.txt")
    harvester = B.build_harvester(cfg.model)
    datamodule = B.build_datamodule(cfg, harvester.tokenizer)
    with pytest.raises(UsageError, match=r"empty"):
        datamodule.setup("fit")


def test_init_from_checkpoint_must_match_the_model(tmp_path: Path) -> None:
    wrong = Autoencoder.from_config("mixed", d_model=32, layer=2, expansion=2, bottleneck=1)
    wrong.save(tmp_path / "wrong")
    cfg = train_cfg(tmp_path, f"init_from={tmp_path}/wrong")
    with pytest.raises(UsageError, match=r"d_model 32.*64"):
        B.build(cfg)
    other_layer = Autoencoder.from_config("mixed", d_model=64, layer=1, expansion=2, bottleneck=1)
    other_layer.save(tmp_path / "layer")
    cfg = train_cfg(tmp_path, f"init_from={tmp_path}/layer")
    with pytest.raises(UsageError, match=r"layer 1.*layer 2"):
        B.build(cfg)


@pytest.mark.slow
def test_several_coders_from_one_harvest_equal_separate_runs(tmp_path: Path) -> None:
    common = ["steps=6", "trainer.val_check_interval=6"]
    multi = train_cfg(
        tmp_path / "multi", *common, "autoencoder.alpha=[0,0.2]", "autoencoder.kind=[mixed,combined]"
    )
    metrics = T.run(multi)
    names = ["mixed-l02-x2-a0-b0", "mixed-l02-x2-a20-b0", "combined-l02-x2-a0-b0", "combined-l02-x2-a20-b0"]
    assert sorted(metrics["coders"]) == sorted(names)
    for name in names:
        assert {"train/mse", "val/mse", "val/density"} <= set(metrics["coders"][name])
        assert (tmp_path / "multi" / "autoencoder" / name / "model.safetensors").is_file()
    # The same training alone, for two of them: identical weights (the harvest is shared, nothing else is).
    for kind, alpha in (("mixed", 0.2), ("combined", 0)):
        single = train_cfg(
            tmp_path / f"{kind}{alpha}", *common, f"autoencoder.alpha={alpha}", f"autoencoder={kind}"
        )
        alone = T.run(single)
        name = f"{kind}-l02-x2-a{int(alpha * 100)}-b0"
        assert alone["val/mse"] == pytest.approx(metrics["coders"][name]["val/mse"], rel=1e-5)
        a = Autoencoder.load(tmp_path / f"{kind}{alpha}" / "autoencoder" / name)
        b = Autoencoder.load(tmp_path / "multi" / "autoencoder" / name)
        for key, tensor in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)
