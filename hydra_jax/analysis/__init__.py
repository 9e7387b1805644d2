"""What the adapters learned: norms, spectra, alignment with W, branch similarity, ablations.

``python -m hydra_jax.analyze --workdir DIR`` runs ``report.analyze`` on a trained run. The
numbers live in ``metrics`` (pure numpy), ``weights`` (weight space) and ``activations`` (on data).
"""

from hydra_jax.analysis.activations import ablate, output_stats, router_usage
from hydra_jax.analysis.metrics import (
    Moments,
    column_basis,
    cosine_per_row,
    effective_rank,
    frobenius,
    linear_cka,
    principal_angles,
    singular_bases,
    singular_values,
    subspace_energy,
)
from hydra_jax.analysis.report import analyze, load_run, mean_routing
from hydra_jax.analysis.weights import analyze_weights, branch_deltas, head_similarity

__all__ = [
    "Moments", "ablate", "analyze", "analyze_weights", "branch_deltas", "column_basis",
    "cosine_per_row", "effective_rank", "frobenius", "head_similarity", "linear_cka",
    "load_run", "mean_routing", "output_stats", "principal_angles", "router_usage",
    "singular_bases", "singular_values", "subspace_energy",
]
