"""The matrix-free Hessian of an arbitrary nn.Module, Lanczos top-k and stochastic Lanczos
quadrature, against dense double-backward autograd Hessians (float64)."""

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian as dense_hessian
from torch.func import functional_call

from deepufm import DeepUFM, UFMConfig
from deepufm.errors import ConfigError
from deepufm.matrices import (
    DenseSymmetric,
    ModuleHessian,
    lanczos_quadrature,
    lanczos_topk,
    layer_hessian,
    module_hessian,
    spectral_density,
)
from deepufm.matrices.lanczos import gaussian_density, rademacher


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics for eval mode
        net[1].running_mean.copy_(torch.tensor([0.3, -0.2]))
        net[1].running_var.copy_(torch.tensor([1.5, 0.7]))
    return net


def data(shape: tuple[int, ...], sizes: list[int], classes: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(sum(sizes), *shape, generator=gen, dtype=torch.float64)
    if classes:
        y = torch.randint(0, 3, (sum(sizes),), generator=gen)
    else:
        y = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64)
    return list(zip(X.split(sizes), y.split(sizes))), X, y


def reference(net: nn.Module, loss_fn, X, y, names=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian of ``loss_fn(net(X), y)`` on all data at once, by double backward, and theta.

    Not ``torch.func.hessian``: in torch 2.13 its ``jacfwd(jacrev)`` is wrong for train-mode
    BatchNorm when both the input and the affine weight depend on the parameters.
    """
    params = dict(net.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[k].shape for k in names]
    theta = torch.cat([params[k].detach().reshape(-1) for k in names])
    buffers = dict(net.named_buffers())

    def f(theta):
        parts = dict(zip(names, theta.split([math.prod(s) for s in shapes])))
        ps = {k: parts[k].reshape(params[k].shape) if k in parts else v for k, v in params.items()}
        return loss_fn(functional_call(net, (ps, {k: b.clone() for k, b in buffers.items()}), X), y)

    return dense_hessian(f, theta), theta


def check_operator(H: ModuleHessian, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(H.dense(), ref, rtol=1e-10, atol=1e-12 * scale)
    V = torch.randn(H.size, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(H.matmat(V), ref @ V, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(H.matvec(V[:, 0]), ref @ V[:, 0], rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_hessian_over_uneven_batches(reduction):
    net = mlp()
    batches, X, y = data((4,), [5, 3, 4], classes=False)
    H = module_hessian(net, nn.MSELoss(reduction=reduction), batches)
    assert H.num_data == 12 and H.reduction == reduction
    ref, theta = reference(net, nn.MSELoss(reduction=reduction), X, y)
    torch.testing.assert_close(H.theta, theta)
    check_operator(H, ref)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cnn_with_batchnorm_and_cross_entropy(mode):
    net = getattr(cnn(), mode)()
    # train-mode BatchNorm normalises with each batch's statistics: one batch, so the
    # reference (the whole data as one batch) is the same function
    sizes = [4, 3] if mode == "eval" else [7]
    batches, X, y = data((1, 6, 6), sizes, classes=True)
    before = {k: b.clone() for k, b in net.named_buffers()}
    H = module_hessian(net, nn.CrossEntropyLoss(), batches)
    ref, _ = reference(net, nn.CrossEntropyLoss(), X, y)
    check_operator(H, ref)
    assert net.training == (mode == "train")
    for k, b in net.named_buffers():  # products never update the running statistics
        assert torch.equal(b, before[k]), k


def test_parameter_subset_is_the_diagonal_block_and_gradient_matches():
    net = mlp()
    batches, X, y = data((4,), [6, 6], classes=True)
    loss_fn = nn.CrossEntropyLoss()
    full = module_hessian(net, loss_fn, batches)
    sub = module_hessian(net, loss_fn, batches, params=["2.weight", "0.bias"])
    assert sub.names == ["0.bias", "2.weight"]  # module order, not the order asked for
    ref, _ = reference(net, loss_fn, X, y, names=["0.bias", "2.weight"])
    check_operator(sub, ref)
    idx = {k: i for i, k in enumerate(full.names)}
    offsets = torch.tensor([0, *full.numels]).cumsum(0)
    rows = torch.cat([torch.arange(offsets[idx[k]], offsets[idx[k] + 1]) for k in sub.names])
    torch.testing.assert_close(full.dense()[rows][:, rows], sub.dense(), rtol=1e-12, atol=1e-14)
    # gradient and loss of the same weighted risk
    out = loss_fn(net(X), y)
    g_ref = torch.autograd.grad(out, [p for p in net.parameters()])
    torch.testing.assert_close(full.gradient(), torch.cat([g.reshape(-1) for g in g_ref]))
    torch.testing.assert_close(full.loss(), out.detach())
    parts = full.unflatten(full.theta)
    torch.testing.assert_close(parts["2.weight"], net[2].weight.detach())


def test_generic_operator_equals_the_structured_layer_hessian():
    """A deep UFM as an nn.Module (features as data, bias-free Linear layers, ReLU): the Hessian
    w.r.t. one layer's weight is the structured ``layer_hessian`` (row-major vec)."""
    cfg = UFMConfig(K=3, n=4, d=5, L=3, activation="relu", init_std=0.8, seed=2, device="cpu")
    model = DeepUFM.init(cfg)
    net = nn.Sequential(
        nn.Linear(5, 5, bias=False), nn.ReLU(), nn.Linear(5, 5, bias=False), nn.ReLU(),
        nn.Linear(5, 3, bias=False),
    ).double()  # fmt: skip
    with torch.no_grad():
        for layer, W in zip([net[0], net[2], net[4]], model.W):
            layer.weight.copy_(W)
    Y = model.labels().T
    batches = [(model.H1.T[:6], Y[:6]), (model.H1.T[6:], Y[6:])]
    loss_fn = lambda out, y: 0.5 * ((out - y) ** 2).sum(dim=1).mean()  # noqa: E731
    for l, name in [(1, "0.weight"), (2, "2.weight"), (3, "4.weight")]:
        H = module_hessian(net, loss_fn, batches, params=[name])
        ref = layer_hessian(model, l).dense()
        torch.testing.assert_close(H.dense(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_lanczos_topk_matches_eigh():
    net = mlp()
    batches, X, y = data((4,), [10], classes=True)
    H = module_hessian(net, nn.CrossEntropyLoss(), batches)
    ref, _ = reference(net, nn.CrossEntropyLoss(), X, y)  # double backward, not H.dense()
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    k = 4
    vals, vecs = lanczos_topk(H, k)
    top = float(ref_vals[0])
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-9 * top)
    torch.testing.assert_close(ref @ vecs, vecs * vals, rtol=0, atol=1e-8 * top)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k), rtol=0, atol=1e-9)
    again, _ = lanczos_topk(H, k)
    assert torch.equal(vals, again)  # seeded start vector
    with pytest.raises(ConfigError):
        lanczos_topk(H, 0)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss()])
def test_hvp_modes_agree(loss_fn):
    """``F.mse_loss(reduction="mean")`` has no forward-over-reverse rule in PyTorch
    (pytorch/pytorch#123996): ``auto`` falls back to reverse-over-reverse; both modes agree."""
    net = mlp()
    classes = isinstance(loss_fn, nn.CrossEntropyLoss)
    batches, X, y = data((4,), [4, 4], classes=classes)
    ref, _ = reference(net, loss_fn, X, y)
    auto = module_hessian(net, loss_fn, batches)
    assert auto.hvp == ("forward" if classes else "reverse")
    check_operator(auto, ref)
    check_operator(module_hessian(net, loss_fn, batches, hvp="reverse"), ref)
    check_operator(module_hessian(net, loss_fn, batches, hvp="autograd"), ref)
    with pytest.raises(ConfigError, match="hvp"):
        module_hessian(net, loss_fn, batches, hvp="both")


def test_refusals():
    net = mlp()
    batches, _, _ = data((4,), [4], classes=False)
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ConfigError, match="deterministic"):
        module_hessian(dropout, nn.MSELoss(), batches)
    module_hessian(dropout.eval(), nn.MSELoss(), batches)  # eval mode is deterministic
    with pytest.raises(ConfigError, match="re-iterable"):
        module_hessian(net, nn.MSELoss(), (b for b in batches))
    with pytest.raises(ConfigError, match="params"):
        module_hessian(net, nn.MSELoss(), batches, params=["9.weight"])
    with pytest.raises(ConfigError, match="reduction"):
        module_hessian(net, nn.MSELoss(reduction="none"), batches)
    with pytest.raises(ConfigError, match="batches"):
        module_hessian(net, nn.MSELoss(), [])
    shuffled = ShuffledBatches(batches[0])
    with pytest.raises(ConfigError, match="deterministic"):
        module_hessian(net, nn.MSELoss(), shuffled)


class ShuffledBatches:
    """A re-iterable data source that permutes the samples on every pass."""

    def __init__(self, batch):
        self.X, self.y, self.calls = *batch, 0

    def __iter__(self):
        self.calls += 1
        perm = torch.randperm(self.X.shape[0], generator=torch.Generator().manual_seed(self.calls))
        return iter([(self.X[perm], self.y[perm])])


# --------------------------------------------------------------------------------------------
# stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


def known_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> DenseSymmetric:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(eigenvalues.numel(), eigenvalues.numel(), generator=gen))[0]
    return DenseSymmetric(Q @ torch.diag(eigenvalues) @ Q.T)


def test_lanczos_quadrature_is_exact_for_low_moments():
    """m steps: ``sum_j tau_j theta_j^k = v^T M^k v / v^T v`` for ``k <= 2m - 1``, each probe."""
    gen = torch.Generator().manual_seed(1)
    M = known_matrix(torch.rand(30, generator=gen, dtype=torch.float64) * 4 - 1)
    V = rademacher(30, 3, seed=2, dtype=torch.float64, device="cpu")
    m = 5
    nodes, weights = lanczos_quadrature(M, V, m)
    assert nodes.shape == (3, m)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    Mk = torch.eye(30)
    for k in range(2 * m):
        exact = (V * (Mk @ V)).sum(dim=0) / 30
        torch.testing.assert_close((weights * nodes**k).sum(dim=1), exact, rtol=1e-9, atol=1e-12)
        Mk = M.M @ Mk
    # degree 2m is beyond Gauss quadrature: the estimate differs (the check above can fail)
    exact = (V * (Mk @ V)).sum(dim=0) / 30
    assert float(((weights * nodes ** (2 * m)).sum(dim=1) - exact).abs().max()) > 1e-6


def test_lanczos_breakdown_on_a_low_rank_matrix():
    """Rank 3 with eigenvalues 5, 3, 2: the Krylov space closes after 4 steps; extra steps add
    nodes of weight 0 and the quadrature stays exact."""
    vals = torch.cat([torch.tensor([5.0, 3.0, 2.0]), torch.zeros(17)])
    M = known_matrix(vals)
    V = rademacher(20, 2, seed=0, dtype=torch.float64, device="cpu")
    nodes, weights = lanczos_quadrature(M, V, 10)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    big = weights > 1e-12
    assert int(big.sum(dim=1).max()) <= 4
    for x in nodes[big].tolist():
        assert min(abs(x - e) for e in (5.0, 3.0, 2.0, 0.0)) < 1e-9
    for k in range(1, 8):
        exact = (V * (torch.linalg.matrix_power(M.M, k) @ V)).sum(dim=0) / 20
        torch.testing.assert_close((weights * nodes**k).sum(dim=1), exact, rtol=1e-9, atol=1e-12)


def test_spectral_density_matches_the_exact_broadened_density():
    gen = torch.Generator().manual_seed(3)
    eigenvalues = torch.cat([torch.full((4,), 8.0), torch.rand(56, generator=gen) * 2])
    M = known_matrix(eigenvalues, seed=4)
    grid = torch.linspace(-2, 11, 1301, dtype=torch.float64)
    sigma = 0.25
    dens = spectral_density(M, num_probes=60, lanczos_steps=25, grid=grid, sigma=sigma, seed=5)
    exact = gaussian_density(grid, eigenvalues, torch.full((60,), 1 / 60), sigma)
    dx = float(grid[1] - grid[0])
    assert float(dens.density.sum()) * dx == pytest.approx(1.0, abs=1e-6)
    l1 = float((dens.density - exact).abs().sum()) * dx
    assert l1 < 0.06
    # the outlier mass 4/60 sits at 8
    near = (grid > 7) & (grid < 9)
    assert float(dens.density[near].sum()) * dx == pytest.approx(4 / 60, abs=0.015)
    # moments: Hutchinson estimates of tr(M^k)/p, within 3 standard deviations of Rademacher
    # probes (Var v^T A v = 2 sum_{i != j} A_ij^2)
    for k in (1, 2):
        A = torch.linalg.matrix_power(M.M, k)
        std = math.sqrt(2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum()) / 60) / 60
        assert abs(dens.moment(k) - float((eigenvalues**k).mean())) < 3 * std
    # a wrong density (e.g. equal weights for every Lanczos node) is far off
    wrong = gaussian_density(grid, dens.nodes, torch.full_like(dens.weights, 1 / 25), sigma) / 60
    assert float((wrong - exact).abs().sum()) * dx > 5 * l1
    again = spectral_density(M, num_probes=60, lanczos_steps=25, grid=grid, sigma=sigma, seed=5)
    assert torch.equal(again.density, dens.density)


def test_spectral_density_of_a_module_hessian_equals_the_dense_one():
    """SLQ on a ModuleHessian against the Gaussian-broadened density of the dense spectrum of an
    independent ``torch.func.hessian``. With enough Lanczos steps the quadrature error is
    negligible and what is left is the Rademacher probes' error, whose standard deviation at each
    grid point is known exactly from the dense eigenpairs (Var v^T A v = 2 sum_{i != j} A_ij^2 for
    A = Q diag(g(t - lambda)) Q^T / p): the L1 error stays within twice its expectation bound."""
    net = mlp()
    batches, X, y = data((4,), [5, 5], classes=True)
    H = module_hessian(net, nn.CrossEntropyLoss(), batches)
    params = {k: v.detach() for k, v in net.named_parameters()}
    shapes = [v.shape for v in params.values()]

    def loss(theta):
        parts = theta.split([math.prod(s) for s in shapes])
        ps = {k: t.reshape(s) for k, t, s in zip(params, parts, shapes)}
        return nn.functional.cross_entropy(functional_call(net, ps, (X,)), y)

    ref = torch.func.hessian(loss)(torch.cat([v.reshape(-1) for v in params.values()]))
    lam, Q = torch.linalg.eigh(ref)
    p, probes = lam.numel(), 100
    sigma = 0.02 * float(lam[-1] - lam[0])
    grid = torch.linspace(float(lam[0]) - 6 * sigma, float(lam[-1]) + 6 * sigma, 801)
    dx = float(grid[1] - grid[0])
    kernel = torch.exp(-0.5 * ((grid[:, None] - lam) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    exact = kernel.mean(dim=1)  # (G,): every eigenvalue with mass 1/p
    A = (Q * (kernel / p).unsqueeze(1)) @ Q.T  # (G, p, p): g(t - M) / p
    off = (A**2).sum(dim=(1, 2)) - (torch.diagonal(A, dim1=1, dim2=2) ** 2).sum(dim=1)
    bound = float(torch.sqrt(2 * off / probes).sum()) * dx  # >= E ||error||_1 over the probes

    def l1(steps):
        dens = spectral_density(
            H, num_probes=probes, lanczos_steps=steps, grid=grid, sigma=sigma, seed=1
        )
        return float((dens.density - exact).abs().sum()) * dx, dens

    err, dens = l1(20)
    assert dens.sigma == sigma and torch.equal(dens.grid, grid)
    assert float(dens.density.sum()) * dx == pytest.approx(1.0, abs=1e-9)
    assert err < 2 * bound
    # moments k <= 2m - 1 are exact per probe: Hutchinson estimates of tr(M^k)/p within 4 standard
    # deviations (the same variance formula)
    for k in (1, 2, 3, 4):
        Mk = torch.linalg.matrix_power(ref, k)
        std = math.sqrt(2 * float((Mk**2).sum() - (torch.diagonal(Mk) ** 2).sum()) / probes) / p
        assert abs(dens.moment(k) - float(torch.trace(Mk)) / p) < 4 * std
    # the bound can fail: too few Lanczos steps for this sigma, or a spectrum off by 10%
    assert l1(6)[0] > 2 * bound
    shifted = (torch.exp(-0.5 * ((grid[:, None] - 1.1 * lam) / sigma) ** 2)).mean(dim=1)
    shifted = shifted / (sigma * math.sqrt(2 * math.pi))
    assert float((dens.density - shifted).abs().sum()) * dx > 2 * bound
