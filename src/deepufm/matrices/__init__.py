"""The deep-learning matrices of the paper (THEORY §5), exact and structured where possible.

Every matrix is a :class:`SymmetricMatrix` (``matmat``, ``dense``, ``eigvalsh``, ``topk``,
``as_linear_operator``); parameter-space vectors are ``vec``-ed row-major (``deepufm.vec``).
"""

from deepufm.matrices.block import BlockHessian, FunctionHessian, block_hessian
from deepufm.matrices.hessian import (
    JacobianGram,
    KroneckerGram,
    gauss_newton,
    hessian_residual,
    layer_hessian,
)
from deepufm.matrices.jacobian import LayerJacobian, layer_jacobian, relu_derivative
from deepufm.matrices.operator import DenseSymmetric, LinearCombination, SymmetricMatrix
from deepufm.matrices.papyan import (
    PapyanDecomposition,
    RowGram,
    jacobian_rows,
    knockout_spectra,
    papyan_decomposition,
)

__all__ = [
    "BlockHessian",
    "DenseSymmetric",
    "FunctionHessian",
    "JacobianGram",
    "KroneckerGram",
    "LayerJacobian",
    "LinearCombination",
    "PapyanDecomposition",
    "RowGram",
    "SymmetricMatrix",
    "gauss_newton",
    "hessian_residual",
    "jacobian_rows",
    "knockout_spectra",
    "layer_hessian",
    "layer_jacobian",
    "papyan_decomposition",
    "relu_derivative",
]

from deepufm.matrices.gradients import (
    backprop_error_matrix,
    data_gradient,
    feature_gram,
    gradient_covariance,
    per_sample_gradients,
    weight_gram,
    weight_singular_values,
)

__all__ += [
    "backprop_error_matrix",
    "block_hessian",
    "data_gradient",
    "feature_gram",
    "gradient_covariance",
    "per_sample_gradients",
    "weight_gram",
    "weight_singular_values",
]
