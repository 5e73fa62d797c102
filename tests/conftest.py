import os

# Triton decides between its CPU interpreter and compiled kernels when a function is decorated, and
# triton.language's own helpers (tl.sum, tl.max, ...) are decorated when triton.language is first
# imported, which torch may do early (torch.func imports Triton-backed ops). So the interpreter mode is
# chosen here, before anything imports torch: the kernel tests run under it on this CPU. It changes
# nothing else: the layers use Triton only for CUDA tensors or an explicit backend="triton".
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests work on small tensors, where one thread is faster than two fighting over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
