"""The TTT layers with backend="triton" (the kernels of seqzoo_plugins.kernels) equal the torch dual form.

On a GPU the kernels run compiled. On the CPU they run under Triton's interpreter, which must be on
before triton is first imported (once torch.func or torch._dynamo has imported triton in compiled mode,
interpreted kernels fail), so the CPU check runs in a fresh process with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqzoo

pytestmark = pytest.mark.triton

CHECK = textwrap.dedent("""
    import sys
    import torch
    import seqzoo
    from seqzoo.testing import assert_close
    from seqzoo_plugins import kernels

    device = sys.argv[1]
    if not kernels.kernels_available(device):
        print("SKIP: kernels unavailable on", device)
        sys.exit(0)
    for name in ("ttt_linear", "ttt_mlp"):
        torch.manual_seed(0)
        fast = seqzoo.create_layer(name, 32, num_heads=2, backend="triton").to(device)
        ref = seqzoo.create_layer(name, 32, num_heads=2, backend="torch").to(device)
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(2, 37, 32, device=device)
        # 3 tokens, then 34: a head to the boundary, two whole mini-batches through the kernel, a tail
        y1, st = fast(x[:, :3])
        y2, st = fast(x[:, 3:], st)
        r1, st_ref = ref(x[:, :3])
        r2, st_ref = ref(x[:, 3:], st_ref)
        assert_close(torch.cat([y1, y2], 1), torch.cat([r1, r2], 1), 1e-5, f"{name}: triton vs torch output")
        for k, v in st_ref.items():
            if v.is_floating_point():
                assert_close(st[k], v, 1e-5, f"{name}: triton vs torch state[{k!r}]")
        g = torch.autograd.grad(fast(x)[0].pow(2).sum(), fast.W1)[0]
        g_ref = torch.autograd.grad(ref(x)[0].pow(2).sum(), ref.W1)[0]
        assert_close(g, g_ref, 1e-5, f"{name}: triton vs torch gradient of W1")
    print("OK")
""")


def test_triton_backend_equals_torch():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert "OK" in out.stdout


def test_explicit_triton_without_kernels_is_a_clear_error(monkeypatch):
    kernels = pytest.importorskip("seqzoo_plugins.kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.kernels_available("cpu"):
        pytest.skip("kernels run on the CPU in this process")
    layer = seqzoo.create_layer("ttt_linear", 32, num_heads=2, backend="triton")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        layer(torch.randn(1, 20, 32))
