"""The deep-learning matrices of the paper (Concepts: *The curvature matrices*), exact and
structured where possible.

Every matrix is a :class:`SymmetricMatrix` (``matmat``, ``dense``, ``eigvalsh``, certified
``topk``, ``as_linear_operator``); parameter-space vectors are ``vec``-ed row-major
(``deepufm.vec``). One module a job: ``operator`` (the interface and the one addition rule),
``spectra`` (the certified top-k engine, the rank rule and the one dense/iterative switch),
``structured`` (Kronecker, row-Gram and Jacobian-Gram matrices), ``hessian`` (the layer Hessian),
``papyan``, ``block``, ``gradients``, ``features``, ``module_hessian``, ``distributed``,
``lanczos`` (spectral densities).
"""

from deepufm.matrices.block import (
    BlockHessian,
    BlockJacobianGram,
    BlockResidual,
    FunctionHessian,
    block_hessian,
)
from deepufm.matrices.features import feature_gram, weight_gram, weight_singular_values, weight_svd
from deepufm.matrices.gradients import (
    GradientCovariance,
    backprop_error_matrix,
    backprop_errors,
    data_gradient,
    gradient_covariance,
    output_errors,
    per_sample_gradients,
)
from deepufm.matrices.hessian import (
    JacobianGram,
    KroneckerGram,
    KroneckerSum,
    RowGram,
    RowSpaceGram,
    ZeroMatrix,
    gauss_newton,
    hessian_residual,
    layer_hessian,
    loss_weighted_factors,
)
from deepufm.matrices.jacobian import LayerJacobian, layer_jacobian, relu_derivative
from deepufm.matrices.lanczos import (
    SpectralDensity,
    frobenius_estimate,
    lanczos_quadrature,
    spectral_density,
)
from deepufm.matrices.module_hessian import ModuleHessian, module_hessian
from deepufm.matrices.operator import DenseSymmetric, LinearCombination, SymmetricMatrix, combine
from deepufm.matrices.papyan import (
    PapyanDecomposition,
    jacobian_rows,
    knockout_spectra,
    labelled_papyan,
    papyan_decomposition,
)
from deepufm.matrices.spectra import (
    Certificate,
    TopK,
    lanczos_topk,
    numerical_rank,
    rank_rtol,
    zero_threshold,
)

__all__ = [
    "BlockHessian",
    "BlockJacobianGram",
    "BlockResidual",
    "Certificate",
    "DenseSymmetric",
    "FunctionHessian",
    "GradientCovariance",
    "JacobianGram",
    "KroneckerGram",
    "KroneckerSum",
    "LayerJacobian",
    "LinearCombination",
    "ModuleHessian",
    "PapyanDecomposition",
    "RowGram",
    "RowSpaceGram",
    "SpectralDensity",
    "SymmetricMatrix",
    "TopK",
    "ZeroMatrix",
    "backprop_error_matrix",
    "backprop_errors",
    "block_hessian",
    "combine",
    "data_gradient",
    "feature_gram",
    "frobenius_estimate",
    "gauss_newton",
    "gradient_covariance",
    "hessian_residual",
    "jacobian_rows",
    "knockout_spectra",
    "labelled_papyan",
    "lanczos_quadrature",
    "lanczos_topk",
    "layer_hessian",
    "layer_jacobian",
    "loss_weighted_factors",
    "module_hessian",
    "numerical_rank",
    "output_errors",
    "papyan_decomposition",
    "per_sample_gradients",
    "rank_rtol",
    "relu_derivative",
    "spectral_density",
    "weight_gram",
    "weight_singular_values",
    "weight_svd",
    "zero_threshold",
]
