# ruff: noqa
# fmt: off
# %% [markdown]
# # Manifolds (the seed notebook, as written)
# The code cells of the seed notebook (`manifolds-notebook`) with only the import lines and the model/dataset
# loading lines changed, so it runs offline on a CPU: a tiny random Qwen3 (`bilae.lm.load_lm`; 19 layers so
# layer 18 exists, d = 136 so latent 2062 of 2176 exists), Python's own documentation as the dataset, and an
# untrained autoencoder saved first to `weights/qwen3-tiny/mixed-l18-x16-a20-b0` in the working directory,
# where the notebook's `Autoencoder.load(model, layer=18, expansion=16, alpha=0.2)` finds it. For real
# results, load a real model and a trained coder instead (see scripts/manifolds.py). `fig.show()` opens a
# browser outside Jupyter. Run:
#
#     python scripts/seed_notebook.py        # or cell by cell (VS Code / Jupytext percent format)

# %%
from bilae.lm import load_lm
from bilae.corpus import text_source

from datasets import Dataset
from einops import einsum

from bilae.analysis import Feature
from bilae.analysis import Manifold
from bilae.analysis.functions import *
from bilae import Autoencoder

import plotly.express as px
import torch

# %%
torch.set_grad_enabled(False)
name = "qwen3-tiny"

# Build the model and tokenizer (offline: a tiny random Qwen3 with the MiniLM tokenizer)
model, tokenizer = load_lm(name, n_layers=19, hidden=136)
model.name_or_path = name
tokenize = lambda dataset: tokenizer(dataset["text"], truncation=True, padding=True, max_length=256)

# Save an (untrained) autoencoder where the notebook's loader looks: weights/qwen3-tiny/mixed-l18-x16-a20-b0
Autoencoder.from_config("mixed", d_model=136, layer=18, expansion=16, alpha=0.2).save(model, root="weights")

# Read the dataset (Python's documentation) and tokenize it
dataset = [{"text": text} for text in text_source("pydoc")]
dataset = Dataset.from_list(dataset[: 2**4]).with_format("torch")
dataset = dataset.map(tokenize, batched=True)

# %%
# Load in the autoencoder
coder = Autoencoder.load(model, layer=18, expansion=16, alpha=0.2).half()

# Load in the feature max-activation visualizer, this can take a while (reduce batch size if needed)
vis = Feature(coder, tokenizer, dataset, max_steps=2**4, batch_size=2**5)

# %%
# Compute the (normalized) grammian matrix
d = coder.down / coder.down.norm(dim=0, keepdim=True)
g = d.T @ d

# Compute and plot the effective dimension (somtimes called participation ratio) per feature.
gpr = generalized_effective_dimension(g)
fig = px.scatter(y=gpr.cpu(), x=list(range(gpr.size(-1))), template='plotly_white', width=600, height=300, title="Number of active elements in the overlap matrix")
fig.update_layout(margin=dict(l=0, r=0, t=30, b=0), showlegend=False).show()

# I recommend not looking at the say top 5/10-ish. 
# There's some dense features which I don't quite understand yet.
# Their manifolds are interesting though.

# Print the top 50 features with the highest effective dimension, possibly corresponding to interesting manifolds.
print(gpr.topk(50).indices.tolist())

# %%
# These are for the coder with '10' tag
# idx = 602
# idx = 11023
# idx = 7695

# These are for the coder with '2' tag
# idx = 10313  # abbreviation manifold
# idx = 3338 # ( manifold
# idx = 15620 # numbers!
# idx = 36 # of
idx = 2062

# Plot the overlaps of the selected feaature
fig = px.histogram(g[idx].cpu(), template='plotly_white', log_y=True, width=600, height=300, range_x=[-1.1, 1.1])
fig.update_layout(margin=dict(l=0, r=0, t=30, b=0), showlegend=False).show()

# Visualise the top 5 features
inds = g[idx].abs().topk(k=5).indices
vis(inds.tolist(), k=3)

# %%
density = einsum(coder.left[inds], coder.right[inds], "out in1, out in2 -> in1 in2")
density = 0.5 * (density + density.T)

manifold = Manifold(dataset, coder.hooked, tokenizer, density, max_steps=2**5)
manifold.spectrum()

# %%
# Plot the manifold, increase `k` to show more points or decrease `total` to sample fewer points.
manifold(k=40_000)
