# %% [markdown]
# # Manifolds
# The seed notebook's flow with bilae: find manifolds of a bilinear autoencoder from its weights, then look at
# real tokens on them. Run it as a script or cell by cell (VS Code / Jupytext percent format):
#
#     python scripts/manifolds.py [CHECKPOINT]          # or BILAE_CHECKPOINT=<folder> python scripts/manifolds.py
#
# CHECKPOINT is an exported autoencoder folder (config.json + model.safetensors) or a bilae-train run directory;
# BILAE_MODEL names its LM (default `minilm`, the demo's). Without a checkpoint the script first trains a tiny
# one on a tiny random Qwen3 (seconds, so CI runs it). Figures go to BILAE_TUTORIAL_OUT (default
# `outputs/manifolds-tutorial`) as HTML files that open offline.

# %%
import os
import sys
from pathlib import Path

import torch
from einops import einsum
from omegaconf import open_dict

from bilae import Autoencoder
from bilae.analysis import Feature, Manifold, ged_figure, generalized_effective_dimension, overlap_histogram
from bilae.analysis.session import next_token_predictor
from bilae.analyze import exported_folder
from bilae.config import compose
from bilae.data import ActivationDataModule
from bilae.hooks import Harvester
from bilae.lm import load_lm

torch.set_grad_enabled(False)
OUT = Path(os.environ.get("BILAE_TUTORIAL_OUT", "outputs/manifolds-tutorial"))
OUT.mkdir(parents=True, exist_ok=True)
CHECKPOINT = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
CHECKPOINT = CHECKPOINT or os.environ.get("BILAE_CHECKPOINT")
MODEL = os.environ.get("BILAE_MODEL", "minilm" if CHECKPOINT else "qwen3-tiny")


def save(fig, name: str) -> None:
    """Write a figure next to one shared plotly.min.js (offline, small files)."""
    fig.write_html(OUT / f"{name}.html", include_plotlyjs="directory")
    print(f"wrote {OUT / name}.html")


# %% [markdown]
# ## Setup
# A checkpoint, its language model hooked at the checkpoint's layer, and some tokenised text (held-out
# sequences of Python's own documentation).

# %%
if CHECKPOINT is None:
    from bilae.train import run

    tiny = [
        "model=qwen3-tiny", "autoencoder.expansion=4", "autoencoder.bottleneck=1", "autoencoder.alpha=0.1",
        "data.n_ctx=32", "data.batch_size=8", "data.val_sequences=32", "data.max_sequences=400",
        "steps=40", "alpha_warmup=10", "buffer_tokens=0", "trainer.val_check_interval=40",
        "trainer.enable_progress_bar=false", "logger=none", "callbacks=none", f"paths.output_dir={OUT / 'train'}",
    ]  # fmt: skip
    cfg = compose("train", tiny)
    with open_dict(cfg):
        del cfg["hydra"]
    run(cfg)
    CHECKPOINT = str(OUT / "train")

folder = Path(CHECKPOINT)
coder = Autoencoder.load(folder if (folder / "config.json").is_file() else exported_folder(folder))
model, tokenizer = load_lm(MODEL)
harvester = Harvester(model, tokenizer, coder.config.layer)
data = ActivationDataModule(tokenizer, "pydoc", n_ctx=64, batch_size=8, val_sequences=64, max_sequences=256)
data.setup("validate")
dataset = {"input_ids": data.val.input_ids, "attention_mask": data.val.attention_mask}
print(coder)

# %%
# The max-activation visualiser (the seed's `Feature(coder, tokenizer, dataset, ...)`; here it also takes the
# harvester that turns tokens into activations).
vis = Feature(coder, tokenizer, dataset, harvester, max_steps=2**3, batch_size=2**3)

# %% [markdown]
# ## Which latents does the bottleneck mix?
# The normalised Gram matrix G = D̂ᵀD̂ of the bottleneck; the generalised effective dimension of each row counts
# the other latents a latent really interacts with in the reconstruction.

# %%
d = coder.down / coder.down.norm(dim=0, keepdim=True)
g = d.T @ d

gpr = generalized_effective_dimension(g)
save(ged_figure(gpr), "ged")

# Skip the densest few (the seed notebook's advice: they are dense and hard to read).
print("top GED:", gpr.topk(min(50, gpr.numel())).indices.tolist())

# %% [markdown]
# ## One latent, its overlaps and its contexts

# %%
idx = int(gpr.topk(10).indices[5])
save(overlap_histogram(g[idx], title=f"Overlaps of latent {idx}"), "overlap")

inds = g[idx].abs().topk(k=5).indices
vis(inds.tolist(), k=3)

# %% [markdown]
# ## The manifold: quadratic form, spectrum, tokens
# The five latents compose into one quadratic form (the "density matrix"); its spectrum says how many
# dimensions the manifold really has, and its top three eigenvectors give the projection (from the weights, not
# PCA of the points). Colour is x̂ᵀMx̂; hovering shows the context, the token and the model's prediction.

# %%
density = einsum(coder.left[inds], coder.right[inds], "out in1, out in2 -> in1 in2")
density = 0.5 * (density + density.T)

manifold = Manifold(
    dataset,
    harvester,
    tokenizer,
    density,
    max_steps=2**5,
    batch_size=2**3,
    predict=next_token_predictor(model),
)
save(manifold.spectrum(), "spectrum")

# %%
save(manifold(k=40_000), "manifold")
print(f"{len(manifold.sample)} tokens on the manifold of latent {idx}; figures in {OUT}")
