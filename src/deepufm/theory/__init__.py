"""The closed-form theory: threshold, constants, the exact DNC optimum and every prediction."""

from deepufm.theory.threshold import b_crit, check_admissible, max_single_lambda, regularisation_b

__all__ = ["b_crit", "check_admissible", "max_single_lambda", "regularisation_b"]
