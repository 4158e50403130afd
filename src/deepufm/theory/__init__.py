"""The closed-form theory: threshold, constants, the exact DNC optimum and every prediction."""
