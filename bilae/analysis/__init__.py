"""Analysis of bilinear autoencoders from their weights (inputs only to visualise): pure functions and figures.

- ``overlap``    — G = D̂ᵀD̂ in row chunks, generalised effective dimension, participation ratio
- ``forms``      — quadratic forms of latent sets and their spectra
- ``composites`` — the atlas of bottleneck composites B_k via a 2s×2s low-rank eigenproblem
- ``manifold``   — streaming top-k sample of tokens on a form's manifold, hover texts
- ``examples``   — streaming max/min-activating contexts and their terminal/HTML/table formats
- ``figures``    — plotly figure builders; ``sweep`` — reading a multirun's metrics.json files
- ``notebook``   — the seed notebook's ``Feature`` and ``Manifold``; ``functions`` — its ``utils.functions`` names
- ``compare``    — two coders: principal cosines of their input subspaces, best matches of their latents
- ``recovery``   — planted manifolds (``data=planted``) against the coder's composites and latent clusters
- ``session``    — one coder and one activation sample, every answer computed once
- ``registry``   — the registry of analyses (session → named panels, with declared needs); ``analyses`` fills it
"""

from bilae.analysis import analyses as analyses  # registers every analysis
from bilae.analysis.compare import Comparison, compare_coders
from bilae.analysis.composites import CompositeAtlas, composite_atlas, composite_form
from bilae.analysis.examples import (
    ActivationExamples,
    ContextRecord,
    collect_examples,
    context_records,
    to_ansi,
    to_html,
    to_rows,
)
from bilae.analysis.figures import (
    atlas_figure,
    ged_figure,
    manifold_figure,
    overlap_histogram,
    pareto_figure,
    spectrum_figure,
)
from bilae.analysis.forms import (
    WEIGHTS,
    QuadraticForm,
    Spectrum,
    latent_form,
    quadratic_form,
    spectrum,
    symmetrize,
)
from bilae.analysis.manifold import ManifoldSample, hover_texts, sample_manifold
from bilae.analysis.notebook import Feature, Manifold
from bilae.analysis.overlap import (
    OverlapStats,
    generalized_effective_dimension,
    overlap_chunks,
    overlap_matrix,
    overlap_rows,
    overlap_stats,
    participation_ratio,
)
from bilae.analysis.recovery import Recovery, recover_planted
from bilae.analysis.sweep import load_sweep

__all__ = [
    "WEIGHTS",
    "ActivationExamples",
    "Comparison",
    "CompositeAtlas",
    "ContextRecord",
    "Feature",
    "Manifold",
    "ManifoldSample",
    "OverlapStats",
    "QuadraticForm",
    "Recovery",
    "Spectrum",
    "atlas_figure",
    "collect_examples",
    "compare_coders",
    "composite_atlas",
    "composite_form",
    "context_records",
    "ged_figure",
    "generalized_effective_dimension",
    "hover_texts",
    "latent_form",
    "load_sweep",
    "manifold_figure",
    "overlap_chunks",
    "overlap_histogram",
    "overlap_matrix",
    "overlap_rows",
    "overlap_stats",
    "pareto_figure",
    "participation_ratio",
    "quadratic_form",
    "recover_planted",
    "sample_manifold",
    "spectrum",
    "spectrum_figure",
    "symmetrize",
    "to_ansi",
    "to_html",
    "to_rows",
]
