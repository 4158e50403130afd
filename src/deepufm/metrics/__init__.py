"""Metrics of collapse, alignment and spectra (THEORY §4.1, §9)."""

from deepufm.metrics.collapse import (
    class_means,
    etf_distance,
    labelled_class_means,
    labelled_nc1,
    nc1,
    orthogonal_frame_distance,
)
from deepufm.metrics.nc3 import (
    back_product,
    nc3_alignment,
    nc3_gram,
    nc3_row_alignment,
    nc3_row_space_residual,
)
from deepufm.metrics.spectral import (
    basis_coefficients,
    effective_rank,
    eigenbasis_coefficients,
    eigvec_alignment,
    eigvec_alignment_matrix,
    gradient_coefficients,
    kron_columns,
    negative_fraction,
    outlier_count,
    outlier_stats,
    projection_proportion,
    singular_vector_alignment,
    subspace_overlap,
)

__all__ = [
    "back_product",
    "basis_coefficients",
    "class_means",
    "effective_rank",
    "eigenbasis_coefficients",
    "eigvec_alignment",
    "eigvec_alignment_matrix",
    "etf_distance",
    "gradient_coefficients",
    "kron_columns",
    "labelled_class_means",
    "labelled_nc1",
    "nc1",
    "nc3_alignment",
    "nc3_gram",
    "nc3_row_alignment",
    "nc3_row_space_residual",
    "negative_fraction",
    "orthogonal_frame_distance",
    "outlier_count",
    "outlier_stats",
    "projection_proportion",
    "singular_vector_alignment",
    "subspace_overlap",
]
