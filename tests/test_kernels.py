"""The TTT Triton kernels equal their torch reference, and the reference equals the primal definition.

The kernels run on the CPU under the Triton interpreter. tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports torch (triton.language's helpers are decorated at its first import, which torch may
trigger); the kernel module itself is decorated lazily under the mode in force at the first call.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from seqzoo_plugins.kernels import (
    kernels_available,
    ttt_linear_decode,
    ttt_linear_forward,
    ttt_mlp_decode,
    ttt_mlp_forward,
)
from seqzoo_plugins.kernels import ttt as kernels_ttt
from seqzoo_plugins.ttt import reference as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_rel(got, want, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def make_inputs(kind, B, H, T, d, mb, dtype=torch.float32, seed=0):
    """Random inputs away from the initial values, so every term of the update matters."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    XQ, XK, XV = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    lr_eta = torch.sigmoid(rnd(B, H, T)) / d * 4.0
    token_eta = (1.0 / torch.arange(1, mb + 1, dtype=torch.float64) + 0.1 * rnd(mb)).clamp_min(0)
    hid = 4 * d if kind == "mlp" else d
    weights = [rnd(B, H, d, hid) / math.sqrt(d), 0.2 * rnd(B, H, 1, hid)]
    if kind == "mlp":
        weights += [rnd(B, H, hid, d) / math.sqrt(hid), 0.2 * rnd(B, H, 1, d)]
    ln_w, ln_b = 1.0 + 0.2 * rnd(H, d), 0.2 * rnd(H, d)
    cast = lambda t: t.to(dtype)
    return dict(
        XQ=cast(XQ),
        XK=cast(XK),
        XV=cast(XV),
        lr_eta=cast(lr_eta),
        token_eta=cast(token_eta),
        weights=[cast(w) for w in weights],
        ln_w=cast(ln_w),
        ln_b=cast(ln_b),
    )


def run_prefill(fns, kind, inp, mb, **kw):
    fn = fns[kind]
    return fn(
        inp["XQ"],
        inp["XK"],
        inp["XV"],
        inp["lr_eta"],
        inp["token_eta"],
        *inp["weights"],
        inp["ln_w"],
        inp["ln_b"],
        mb,
        **kw,
    )


KERNEL = {"linear": ttt_linear_forward, "mlp": ttt_mlp_forward}
REFERENCE = {"linear": ref.ttt_linear_reference, "mlp": ref.ttt_mlp_reference}


# --------------------------------------------------------------------------------------------------
# the reference against the definition: a per-token primal loop with autograd gradients
# --------------------------------------------------------------------------------------------------
def _f_res(kind, params, x):
    if kind == "linear":
        return x @ params[0] + params[1][0]
    return F.gelu(x @ params[0] + params[1][0], approximate="tanh") @ params[2] + params[3][0]


def _inner_loss(params, k, v, kind, ln_w, ln_b):
    """ℓ = ½‖f(k) − v‖² with f(x) = x + LN(f_res(x)), written independently of the reference."""
    pred = k + F.layer_norm(_f_res(kind, params, k), k.shape, ln_w, ln_b, eps=1e-6)
    return 0.5 * (pred - v).pow(2).sum()


def primal_loop(kind, inp, mb):
    """z_i = XQ_i + LN(f_res(XQ_i; W̄_i)), W̄_i = W − Σ_{j≤i} η[i,j] ∇ℓ_j(W), token by token."""
    XQ, XK, XV, lr, tok = inp["XQ"], inp["XK"], inp["XV"], inp["lr_eta"], inp["token_eta"]
    B, H, T, d = XQ.shape
    grad_fn = torch.func.grad(_inner_loss)
    Z = torch.empty_like(XQ)
    final = [torch.empty_like(w) for w in inp["weights"]]
    for b in range(B):
        for h in range(H):
            ln_w, ln_b = inp["ln_w"][h], inp["ln_b"][h]
            params = [w[b, h] for w in inp["weights"]]
            for s in range(0, T, mb):
                n = min(mb, T - s)
                grads = [
                    grad_fn(params, XK[b, h, s + j], XV[b, h, s + j], kind, ln_w, ln_b) for j in range(n)
                ]
                for i in range(n):
                    w_bar = [
                        p - sum(tok[i] * lr[b, h, s + j] * grads[j][m] for j in range(i + 1))
                        for m, p in enumerate(params)
                    ]
                    q = XQ[b, h, s + i]
                    Z[b, h, s + i] = q + F.layer_norm(_f_res(kind, w_bar, q), (d,), ln_w, ln_b, eps=1e-6)
                if n == mb:
                    params = w_bar
            for m, p in enumerate(params):
                final[m][b, h] = p
    return Z, *final


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("T,mb,d", [(37, 16, 16), (20, 8, 16), (5, 8, 16)])
def test_reference_dual_equals_primal(kind, T, mb, d):
    inp = make_inputs(kind, 1, 2, T, d, mb, dtype=torch.float64)
    want = primal_loop(kind, inp, mb)
    got = run_prefill(REFERENCE, kind, inp, mb)
    for name, g, w in zip(["Z", "W1", "b1", "W2", "b2"], got, want):
        assert_rel(g, w, 1e-10, f"dual reference {kind} {name}")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_decode_reference_chain_equals_prefill_reference(kind):
    """Decoding token by token (commit W̄ at each mini-batch end) equals the dual form."""
    T, mb, d = 20, 8, 16
    inp = make_inputs(kind, 2, 1, T, d, mb, dtype=torch.float64)
    weights = list(inp["weights"])
    decode = ref.ttt_linear_decode_reference if kind == "linear" else ref.ttt_mlp_decode_reference
    n = len(weights)
    zs = []
    for t in range(T):
        i = t % mb
        if i == 0:
            grads = [torch.zeros_like(w) for w in weights]
        out = decode(
            inp["XQ"][:, :, t],
            inp["XK"][:, :, t],
            inp["XV"][:, :, t],
            inp["lr_eta"][:, :, t],
            inp["token_eta"][i],
            *weights,
            *grads,
            inp["ln_w"],
            inp["ln_b"],
        )
        zs.append(out[0])
        grads, w_bar = list(out[1 : 1 + n]), list(out[1 + n :])
        if i == mb - 1:
            weights = w_bar
    want = run_prefill(REFERENCE, kind, inp, mb)
    assert_rel(torch.stack(zs, dim=2), want[0], 1e-10, f"{kind} decode chain Z")
    for m in range(n):
        assert_rel(weights[m], want[1 + m], 1e-10, f"{kind} decode chain weight {m}")


# --------------------------------------------------------------------------------------------------
# kernels against the reference
# --------------------------------------------------------------------------------------------------
FORWARD_CASES = [
    ("linear", 1, 2, 37, 16, 16),
    ("linear", 2, 1, 20, 32, 8),
    ("linear", 1, 1, 37, 64, 16),
    ("linear", 1, 2, 40, 16, 32),
    ("mlp", 1, 2, 37, 16, 16),
    ("mlp", 2, 1, 20, 32, 8),
    ("mlp", 1, 1, 20, 64, 16),
]


@pytest.mark.parametrize("kind,B,H,T,d,mb", FORWARD_CASES)
def test_forward_matches_reference(kind, B, H, T, d, mb):
    inp = make_inputs(kind, B, H, T, d, mb)
    got = run_prefill(KERNEL, kind, inp, mb)
    want = run_prefill(REFERENCE, kind, inp, mb)
    assert len(got) == len(want)
    for name, g, w in zip(["Z", "W1", "b1", "W2", "b2"], got, want):
        assert g.dtype == w.dtype
        assert_rel(g, w, 1e-4, f"{kind} d={d} T={T} b={mb} {name}")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forward_float64_is_exact(kind):
    inp = make_inputs(kind, 1, 2, 21, 16, 8, dtype=torch.float64)
    for name, g, w in zip(
        ["Z", "W1", "b1", "W2", "b2"], run_prefill(KERNEL, kind, inp, 8), run_prefill(REFERENCE, kind, inp, 8)
    ):
        assert_rel(g, w, 1e-12, f"{kind} float64 {name}")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forward_bf16_inputs(kind):
    """bf16 activations with fp32 weights: the kernel equals the fp32 reference on the same values."""
    inp = make_inputs(kind, 1, 2, 24, 16, 16)
    bf = {k: inp[k].bfloat16() for k in ("XQ", "XK", "XV")}
    got = run_prefill(KERNEL, kind, {**inp, **bf}, 16)
    want = run_prefill(REFERENCE, kind, {**inp, **{k: v.float() for k, v in bf.items()}}, 16)
    assert got[0].dtype == torch.bfloat16
    assert_rel(got[0], want[0], 1e-2, f"{kind} bf16 Z")  # bf16 rounding of the output
    for g, w in zip(got[1:], want[1:]):
        assert_rel(g, w, 1e-4, f"{kind} bf16 weights")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_empty_and_short_sequences(kind):
    for T in (0, 3):
        inp = make_inputs(kind, 1, 1, T, 16, 16)
        got, want = run_prefill(KERNEL, kind, inp, 16), run_prefill(REFERENCE, kind, inp, 16)
        assert got[0].shape == (1, 1, T, 16)
        for g, w in zip(got[1:], inp["weights"]):  # no full mini-batch: weights unchanged
            assert torch.equal(g, w)
        if T:
            assert_rel(got[0], want[0], 1e-4, f"{kind} T={T}")


def test_noncontiguous_and_expanded_inputs():
    """Views as a layer makes them: (B, T, H, d) transposed to (B, H, T, d), weights expanded over B."""
    inp = make_inputs("linear", 1, 2, 20, 16, 8)
    B, H, T, d = inp["XQ"].shape
    views = {k: inp[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("XQ", "XK", "XV")}
    assert not views["XQ"].is_contiguous()
    weights = [w[:1].expand(2, *w.shape[1:]) for w in inp["weights"]]  # batch 2 sharing W0
    two = {k: torch.cat([v, v.flip(2)]) for k, v in views.items()}
    case = {**inp, **two, "lr_eta": inp["lr_eta"].expand(2, H, T), "weights": weights}
    got = run_prefill(KERNEL, "linear", case, 8)
    want = run_prefill(REFERENCE, "linear", {**case, **{k: v.contiguous() for k, v in two.items()}}, 8)
    for g, w in zip(got, want):
        assert_rel(g, w, 1e-4, "non-contiguous inputs")


def _decode_inputs(kind, B, H, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    inp = make_inputs(kind, B, H, 1, d, 4, dtype=dtype, seed=seed)
    xq, xk, xv = (inp[k][:, :, 0] for k in ("XQ", "XK", "XV"))
    lr = inp["lr_eta"][:, :, 0]
    grads = [
        (0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64)).to(dtype) for w in inp["weights"]
    ]
    return xq, xk, xv, lr, inp["weights"], grads, inp["ln_w"], inp["ln_b"]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("d,per_row_token_eta", [(16, True), (32, False), (64, True)])
def test_decode_matches_reference(kind, d, per_row_token_eta):
    B, H = 2, 2
    xq, xk, xv, lr, weights, grads, ln_w, ln_b = _decode_inputs(kind, B, H, d, seed=d)
    tok = torch.tensor([0.5, 0.25]) if per_row_token_eta else 1.0 / 3
    kernel = ttt_linear_decode if kind == "linear" else ttt_mlp_decode
    reference = ref.ttt_linear_decode_reference if kind == "linear" else ref.ttt_mlp_decode_reference
    got = kernel(xq, xk, xv, lr, tok, *weights, *grads, ln_w, ln_b)
    want = reference(xq, xk, xv, lr, tok, *weights, *grads, ln_w, ln_b)
    assert len(got) == len(want) == 1 + 2 * len(weights)
    for m, (g, w) in enumerate(zip(got, want)):
        assert_rel(g, w, 1e-4, f"{kind} decode d={d} output {m}")


# --------------------------------------------------------------------------------------------------
# gradients: the autograd.Function's recompute backward equals autograd through the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,T,mb,d,group",
    [
        ("linear", 37, 16, 16, 1),
        ("linear", 20, 8, 32, 2),
        ("linear", 20, 8, 16, 0),
        ("mlp", 37, 16, 16, None),
        ("mlp", 20, 8, 16, 4),
    ],
)
def test_gradients_match_reference(kind, T, mb, d, group):
    inp = make_inputs(kind, 1, 2 if kind == "linear" else 1, T, d, mb)
    leaves = [
        inp["XQ"],
        inp["XK"],
        inp["XV"],
        inp["lr_eta"],
        inp["token_eta"],
        *inp["weights"],
        inp["ln_w"],
        inp["ln_b"],
    ]
    for t in leaves:
        t.requires_grad_(True)
    got_out = run_prefill(KERNEL, kind, inp, mb, checkpoint_group=group)
    want_out = run_prefill(REFERENCE, kind, inp, mb)
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g) for o in want_out]  # loss through Z and the final weights
    got = torch.autograd.grad(got_out, leaves, cotangents)
    want = torch.autograd.grad(want_out, leaves, cotangents)
    names = ["XQ", "XK", "XV", "lr_eta", "token_eta"] + [f"weight{m}" for m in range(len(inp["weights"]))]
    for name, a, b in zip(names + ["ln_w", "ln_b"], got, want):
        assert_rel(a, b, 1e-4, f"{kind} grad {name} (group {group})")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_decode_gradients_match_reference(kind):
    xq, xk, xv, lr, weights, grads, ln_w, ln_b = _decode_inputs(kind, 1, 2, 16, seed=3)
    leaves = [xq, xk, xv, lr, *weights, *grads, ln_w, ln_b]
    for t in leaves:
        t.requires_grad_(True)
    kernel = ttt_linear_decode if kind == "linear" else ttt_mlp_decode
    reference = ref.ttt_linear_decode_reference if kind == "linear" else ref.ttt_mlp_decode_reference
    got_out = kernel(xq, xk, xv, lr, 0.5, *weights, *grads, ln_w, ln_b)
    want_out = reference(xq, xk, xv, lr, 0.5, *weights, *grads, ln_w, ln_b)
    g = torch.Generator().manual_seed(2)
    cot = [torch.randn(o.shape, generator=g) for o in want_out]
    for a, b in zip(torch.autograd.grad(got_out, leaves, cot), torch.autograd.grad(want_out, leaves, cot)):
        assert_rel(a, b, 1e-4, f"{kind} decode grad")


# --------------------------------------------------------------------------------------------------
# selection, errors, the GPU check's CPU-safe path
# --------------------------------------------------------------------------------------------------
def test_kernels_are_interpreted_under_the_variable():
    from triton.runtime.interpreter import InterpretedFunction

    assert kernels_available("cpu")
    assert isinstance(kernels_ttt.load_kernels().ttt_linear_fwd_kernel, InterpretedFunction)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels_available("cpu")
    inp = make_inputs("linear", 1, 1, 8, 16, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_prefill(KERNEL, "linear", inp, 8)


def test_bad_shapes_raise():
    inp = make_inputs("linear", 1, 2, 8, 16, 8)
    with pytest.raises(ValueError, match=r"token_eta of shape"):
        run_prefill(KERNEL, "linear", {**inp, "token_eta": inp["token_eta"][:4]}, 8)
    with pytest.raises(ValueError, match=r"W1 of shape"):
        run_prefill(KERNEL, "linear", {**inp, "weights": [inp["weights"][0][..., :8], inp["weights"][1]]}, 8)
    with pytest.raises(ValueError, match=r"head_dim a power of two"):
        bad = make_inputs("linear", 1, 1, 8, 12, 8)
        run_prefill(KERNEL, "linear", bad, 8)
    with pytest.raises(ValueError, match=r"xq of shape"):
        ttt_linear_decode(
            inp["XQ"],
            inp["XQ"],
            inp["XQ"],
            inp["lr_eta"],
            1.0,
            *inp["weights"],
            *inp["weights"],
            inp["ln_w"],
            inp["ln_b"],
        )


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("OUT", str(tmp_path))
    report = gpu_check.main(["--dry-run"])
    assert report["equivalence"], "the dry run checks the kernels against the reference"
    assert all(row["ok"] for row in report["equivalence"]), report["equivalence"]
    assert (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kernels_compile_for_hopper(kind, monkeypatch, request):
    """The interpreter is lenient: compile the kernels for sm_90 (no GPU needed) to catch what it lets by."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("compiles for sm_90 (~1 min): run with -m slow")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    module = kernels_ttt.load_kernels()
    scalars = {"T", "NH", "N_CKPT"}
    meta = lambda *shape: torch.empty(shape, device="meta")
    mlp_weights = lambda d: [meta(d, 4 * d), meta(1, 4 * d), meta(4 * d, d), meta(1, d)]
    cases = {
        "linear": [
            (
                module.ttt_linear_fwd_kernel,
                dict(D=64, MB=16, BT=16, CKPT_EVERY=4, DOT=tl.bfloat16),
                [meta(64, 64)],
            ),
            (
                module.ttt_linear_fwd_kernel,
                dict(D=128, MB=8, BT=16, CKPT_EVERY=0, DOT=tl.float32),
                [meta(128, 128)],
            ),
            (module.ttt_linear_decode_kernel, dict(D=64), [meta(64, 64)]),
        ],
        "mlp": [
            (
                module.ttt_mlp_fwd_kernel,
                dict(D=64, HID=256, MB=16, BT=16, CKPT_EVERY=4, DOT=tl.bfloat16),
                mlp_weights(64),
            ),
            (
                module.ttt_mlp_fwd_kernel,
                dict(D=128, HID=512, MB=16, BT=16, CKPT_EVERY=4, DOT=tl.bfloat16),
                mlp_weights(128),
            ),
        ],
    }[kind]
    cases = [(fn, consts, kernels_ttt._num_warps(weights)) for fn, consts, weights in cases]  # the launch's
    if kind == "mlp":
        for d in (64, 128):
            hb, num_warps = kernels_ttt._mlp_decode_block(d, 4 * d)
            cases.append((module.ttt_mlp_decode_kernel, dict(D=d, HID=4 * d, HB=hb), num_warps))
    for fn, consts, num_warps in cases:
        consts = {**consts, "ACC": tl.float32, "EPS": 1e-6}
        if "DOT" in consts:
            consts["PREC"] = "ieee"
        signature = {
            name: "constexpr" if name in consts else "i32" if name in scalars else "*fp32"
            for name in fn.arg_names
        }
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        if consts.get("DOT") == tl.bfloat16:  # the bf16 matmuls run on the tensor cores
            assert "mma" in compiled.asm["ptx"], f"{fn.__name__}: no (wg)mma instruction in the PTX"
