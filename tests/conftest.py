import os
import zlib

# Triton kernels run on CPU tensors through the interpreter when no GPU is visible; the variable
# must be set before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_empty_tensors():
    """Every torch.empty is NaN-filled, so an output element a kernel forgets to write fails."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # different random inputs in every test, reproducible from the test's id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
