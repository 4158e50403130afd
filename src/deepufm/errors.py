"""Errors raised for bad input and failed runs.

Every user-facing error names the parameter, its value and the valid range; the CLI prints the
message as one paragraph (no traceback) and exits with a non-zero status.
"""

from __future__ import annotations


class DeepUFMError(Exception):
    """Base class of every error deepufm raises on purpose."""


class ConfigError(DeepUFMError, ValueError):
    """A parameter outside its valid range.

    Args:
        param: the parameter's name as the user spells it (``"K"``, ``"lam_W"``, ``"--lr"``).
        value: the offending value.
        valid: what would have been accepted (``"an integer >= 2"``).
        detail: optional extra sentence(s).
    """

    def __init__(self, param: str, value: object, valid: str, detail: str = "") -> None:
        self.param, self.value, self.valid = param, value, valid
        msg = f"invalid {param}={value!r}: expected {valid}."
        if detail:
            msg += " " + detail
        super().__init__(msg)


class DivergenceError(DeepUFMError, RuntimeError):
    """Training produced a non-finite loss or gradient."""

    def __init__(self, epoch: int, lr: float, detail: str = "") -> None:
        self.epoch, self.lr = epoch, lr
        msg = (
            f"training diverged at epoch {epoch} with lr={lr!r}: the loss or gradient became "
            f"non-finite. Lower the learning rate (--lr)."
        )
        if detail:
            msg += " " + detail
        super().__init__(msg)


class ConvergenceError(DeepUFMError, RuntimeError):
    """An iterative eigensolver stopped before reaching its tolerance."""

    def __init__(self, solver: str, k: int, products: int, detail: str = "") -> None:
        self.solver, self.k, self.products = solver, k, products
        msg = (
            f"{solver} did not converge to {k} eigenpairs after {products} matrix-vector "
            f"products. Loosen tol or raise max_basis."
        )
        if detail:
            msg += " " + detail
        super().__init__(msg)


class UncertifiedError(DeepUFMError, RuntimeError):
    """A top-k whose certificate failed (``strict=True``): a residual, the orthogonality or the
    check for a missed eigenvalue above ``theta_k`` (``deepufm.matrices.spectra``)."""

    def __init__(self, method: str, k: int, reason: str) -> None:
        self.method, self.k, self.reason = method, k, reason
        super().__init__(
            f"the top {k} eigenpairs from {method} could not be certified: {reason}. Tighten "
            "tol, raise block or max_basis, or use the dense route for small matrices."
        )


class RunError(DeepUFMError, RuntimeError):
    """A run failed for a reason outside its input: a full disk, a read-only target, memory.

    The command line exits with status 1 (bad input: 2).
    """


class Interrupted(DeepUFMError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written.

    ``exit_code`` is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, epoch: int, where: str) -> None:
        import signal

        self.signum, self.epoch = signum, epoch
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at epoch {epoch}; {where}")
