import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_default():
    # Tests compare in float64; keep any tensor created without an explicit dtype in float64 too.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
