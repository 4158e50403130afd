import os

# The tests' tensors are small: one intra-op thread per process is faster than two, and keeps the
# suite's time steady when another process (a second pytest, a spawned rank) holds the other core
# — OpenMP regions otherwise wait on descheduled workers. Set before torch starts its pool, and
# inherited by the subprocesses that the CLI and distributed tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_default():
    # Tests compare in float64; keep any tensor created without an explicit dtype in float64 too.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
