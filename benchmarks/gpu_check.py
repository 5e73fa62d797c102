"""One-shot GPU check of the TTT Triton kernels: equivalence at real sizes, then prefill/decode timings.

    python benchmarks/gpu_check.py                # on a CUDA machine, < 8 minutes on an H200
    python benchmarks/gpu_check.py --dry-run      # tiny sizes; on a CPU it runs under TRITON_INTERPRET=1

1. Equivalence (fp32 and bf16): kernels vs the torch reference (prefill with a remainder, decode,
   gradients through the recompute backward), relative errors against stated tolerances.
2. Timings at 1.3B widths (width 2048, 32 heads, head_dim 64, batch 16), prefill at 2k..32k tokens and
   decode per token: TTT-Linear / TTT-MLP kernels, the torch reference, causal
   ``scaled_dot_product_attention`` (flash) with the same q/k/v widths, and mamba-ssm's ``Mamba`` when
   installed. A time guard skips what no longer fits. Results are printed as a table and written to
   ``$OUT/gpu_check.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from seqzoo.bench import speed


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
def sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(B=1, H=1, d=16, mb=16, lengths=[40], eq_T=37, eq_B=1, eq_H=1, grad_T=40, grad_H=1)
    return dict(
        B=16,
        H=32,
        d=64,
        mb=16,
        lengths=[2048, 4096, 8192, 16384, 32768],
        eq_T=2048 + 5,
        eq_B=2,
        eq_H=32,
        grad_T=256 + 5,
        grad_H=4,
    )


class Budget:
    """Wall-clock guard: measurements are skipped once less than ``reserve_s`` is left."""

    def __init__(self, total_s: float, reserve_s: float = 10.0):
        self.deadline = time.perf_counter() + total_s
        self.reserve_s = reserve_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def ok(self) -> bool:
        return self.left() > self.reserve_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device, budget: Budget, target_s: float, max_reps: int) -> float | None:
    """Median seconds of fn() after one warm-up call (which also compiles), repeated for about
    ``target_s`` (at most ``max_reps`` times, never past the budget's reserve); None when out of time."""
    if not budget.ok():
        return None
    if target_s <= 0:  # a smoke run: the one call is the measurement
        return speed.time_in_turn({0: fn}, repeats=1, warmup=0, device=device)[0]["median"]
    first = speed.time_in_turn({0: fn}, repeats=1, warmup=0, device=device)[0]["median"]
    reps = max(1, min(max_reps, int(target_s / max(first, 1e-6))))
    seconds = max(min(target_s, budget.left() - budget.reserve_s), 0.0)
    return speed.time_in_turn({0: fn}, repeats=reps, warmup=0, device=device, max_seconds=seconds)[0]["median"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
def make_inputs(kind, B, H, T, d, mb, device, act_dtype=torch.float32, seed=0):
    """Random prefill inputs, generated on the device (32k-token activations are 1e9 numbers)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, dt=torch.float32: torch.randn(*s, generator=g, device=device, dtype=dt)
    hid = 4 * d if kind == "mlp" else d
    weights = [rnd(B, H, d, hid) / math.sqrt(d), 0.1 * rnd(B, H, 1, hid)]
    if kind == "mlp":
        weights += [rnd(B, H, hid, d) / math.sqrt(hid), 0.1 * rnd(B, H, 1, d)]
    idx = torch.arange(1, mb + 1, device=device, dtype=torch.float32)
    return dict(
        XQ=rnd(B, H, T, d, dt=act_dtype),
        XK=rnd(B, H, T, d, dt=act_dtype),
        XV=rnd(B, H, T, d, dt=act_dtype),
        lr_eta=torch.sigmoid(rnd(B, H, T)) / d,
        token_eta=(1.0 / idx + 0.05 * rnd(mb)).clamp_min(0),
        weights=weights,
        ln_w=1.0 + 0.1 * rnd(H, d),
        ln_b=0.1 * rnd(H, d),
    )


def prefill(fn, inp, mb, **kw):
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


def decode_args(inp):
    """Arguments of one decode step from prefill inputs: the first token, accumulated grads ≠ 0."""
    x = [inp[k][:, :, 0].contiguous() for k in ("XQ", "XK", "XV")]
    lr = inp["lr_eta"][:, :, 0].contiguous()
    token_eta_i = torch.full(
        (lr.shape[0],), 0.5, device=lr.device
    )  # a tensor: no host-to-device copy per call
    grads = [0.01 * torch.randn_like(w) for w in inp["weights"]]
    return (*x, lr, token_eta_i, *inp["weights"], *grads, inp["ln_w"], inp["ln_b"])


# ----------------------------------------------------------------------------------------------------
# 1. equivalence
# ----------------------------------------------------------------------------------------------------
def check_equivalence(K, cfg, device, budget) -> list[dict]:
    rows = []
    S = cfg
    for kind in ("linear", "mlp"):
        kernel = K.ttt_linear_forward if kind == "linear" else K.ttt_mlp_forward
        reference = K.ttt_linear_reference if kind == "linear" else K.ttt_mlp_reference
        dec_kernel = K.ttt_linear_decode if kind == "linear" else K.ttt_mlp_decode
        dec_reference = K.ttt_linear_decode_reference if kind == "linear" else K.ttt_mlp_decode_reference
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            if not budget.ok():
                break
            name = f"{kind} prefill {str(dtype)[6:]} B={S['eq_B']} H={S['eq_H']} T={S['eq_T']} d={S['d']}"
            inp = make_inputs(kind, S["eq_B"], S["eq_H"], S["eq_T"], S["d"], S["mb"], device, dtype)
            with torch.no_grad():
                got = prefill(kernel, inp, S["mb"])
                ref_inp = {**inp, **{k: inp[k].float() for k in ("XQ", "XK", "XV")}}
                want = prefill(reference, ref_inp, S["mb"])
            err = max(rel_err(a, b) for a, b in zip(got, want))
            rows.append(dict(check=name, max_rel_err=err, tol=tol, ok=bool(err <= tol)))

        inp = make_inputs(kind, S["B"], S["H"], 1, S["d"], S["mb"], device)
        args = decode_args(inp)
        with torch.no_grad():
            err = max(rel_err(a, b) for a, b in zip(dec_kernel(*args), dec_reference(*args)))
        rows.append(
            dict(
                check=f"{kind} decode fp32 B={S['B']} H={S['H']}",
                max_rel_err=err,
                tol=1e-4,
                ok=bool(err <= 1e-4),
            )
        )

        if budget.ok():
            inp = make_inputs(kind, 1, S["grad_H"], S["grad_T"], S["d"], S["mb"], device)
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
            out_k = prefill(kernel, inp, S["mb"], checkpoint_group=2)
            out_r = prefill(reference, inp, S["mb"])
            cot = [torch.randn_like(o) for o in out_r]
            gk = torch.autograd.grad(out_k, leaves, cot)
            gr = torch.autograd.grad(out_r, leaves, cot)
            err = max(rel_err(a, b) for a, b in zip(gk, gr))
            rows.append(
                dict(
                    check=f"{kind} gradients fp32 H={S['grad_H']} T={S['grad_T']}",
                    max_rel_err=err,
                    tol=1e-4,
                    ok=bool(err <= 1e-4),
                )
            )
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. timings
# ----------------------------------------------------------------------------------------------------
def ttt_flops_per_token(kind: str, H: int, d: int, mb: int) -> float:
    """Matmul FLOPs per token of the dual form (all heads): 2·(rows·inner·cols) per matmul, per token."""
    if kind == "linear":  # XK·W, XQ·W, XQ·XKᵀ, η·G, weight update
        return H * (3 * 2 * d * d + 2 * 2 * mb * d)
    h = 4 * d  # the two layers, forward on keys, G1 = G2·W2ᵀ, dual terms, updates
    return H * (8 * 2 * d * h + 2 * 2 * mb * (d + h) + 2 * 2 * mb * d)


def load_mamba(width: int, device):
    try:
        from mamba_ssm import Mamba  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another CUDA
        return None
    return Mamba(d_model=width, d_state=16, d_conv=4, expand=2).to(device=device, dtype=torch.bfloat16)


def run_timings(K, cfg, device, budget, dry_run: bool) -> list[dict]:
    B, H, d, mb = cfg["B"], cfg["H"], cfg["d"], cfg["mb"]
    width = H * d
    rows = []
    target = 0.0 if dry_run else 0.6
    mamba = None if device.type != "cuda" else load_mamba(width, device)

    def measure(op, T, fn, tokens, max_reps, flops_per_token=None):
        """Time fn and add a row; a failure (out of memory, an API difference) becomes a note."""
        row = dict(op=op, T=T, ms=None, us_per_token=None, note="")
        try:
            with torch.no_grad():
                seconds = timeit(fn, device, budget, target, max_reps)
        except Exception as e:  # keep going: one failed measurement must not lose the others
            seconds, row["note"] = None, f"failed: {type(e).__name__}: {str(e)[:120]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if seconds is None and not row["note"]:
            row["note"] = "skipped: time guard"
        if seconds is not None:
            row.update(ms=seconds * 1e3, us_per_token=seconds / tokens * 1e6)
            if flops_per_token:
                row["tflops"] = flops_per_token * tokens / seconds / 1e12
        rows.append(row)

    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    short = cfg["lengths"][:2]  # the reference is a Python loop over mini-batches: time it at these only
    for T in cfg["lengths"]:
        for kind in ("linear", "mlp"):
            inp = make_inputs(kind, B, H, T, d, mb, device, act)
            kernel = K.ttt_linear_forward if kind == "linear" else K.ttt_mlp_forward
            reference = K.ttt_linear_reference if kind == "linear" else K.ttt_mlp_reference
            flops = ttt_flops_per_token(kind, H, d, mb)
            measure(f"ttt_{kind} triton prefill", T, partial(prefill, kernel, inp, mb), B * T, 10, flops)
            if T in short:
                ref_inp = {**inp, **{k: inp[k].float() for k in ("XQ", "XK", "XV")}}
                fn = partial(prefill, reference, ref_inp, mb)
                measure(f"ttt_{kind} torch reference prefill (fp32)", T, fn, B * T, 3, flops)
                del ref_inp
            del inp
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=act) for _ in range(3))
        causal = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        measure("sdpa causal prefill", T, causal, B * T, 20, 2 * H * d * T)
        one_query = partial(F.scaled_dot_product_attention, q[:, :, -1:], k, v)  # decode against a KV cache
        measure("sdpa decode (KV cache of T)", T, one_query, B, 100)
        del q, k, v, causal, one_query
        if mamba is not None:
            x = torch.randn(B, T, width, device=device, dtype=torch.bfloat16)
            measure("mamba-ssm Mamba prefill", T, partial(mamba, x), B * T, 10)
            del x

    for kind in ("linear", "mlp"):
        args = decode_args(make_inputs(kind, B, H, 1, d, mb, device))
        kernel = K.ttt_linear_decode if kind == "linear" else K.ttt_mlp_decode
        reference = K.ttt_linear_decode_reference if kind == "linear" else K.ttt_mlp_decode_reference
        measure(f"ttt_{kind} triton decode", 1, partial(kernel, *args), B, 200)
        measure(f"ttt_{kind} torch reference decode", 1, partial(reference, *args), B, 200)
    if mamba is not None:
        try:
            conv_state, ssm_state = mamba.allocate_inference_cache(B, 1, dtype=torch.bfloat16)
            x1 = torch.randn(B, 1, width, device=device, dtype=torch.bfloat16)
            measure("mamba-ssm Mamba decode", 1, partial(mamba.step, x1, conv_state, ssm_state), B, 200)
        except Exception as e:  # allocate_inference_cache differs between mamba-ssm versions
            rows.append(
                dict(op="mamba-ssm Mamba decode", T=1, ms=None, us_per_token=None, note=f"failed: {e}")
            )
    else:
        rows.append(
            dict(op="mamba-ssm Mamba", T=0, ms=None, us_per_token=None, note="mamba-ssm not installed")
        )
    return rows


# ----------------------------------------------------------------------------------------------------
def print_report(report: dict) -> None:
    print(f"# TTT kernel check on {report['device']}  ({report['elapsed_s']:.0f} s)")
    print("\n## equivalence (kernel vs torch reference)")
    print(f"{'check':<60} {'max rel err':>12} {'tol':>8}  ok")
    for r in report["equivalence"]:
        print(f"{r['check']:<60} {r['max_rel_err']:>12.2e} {r['tol']:>8.0e}  {'yes' if r['ok'] else 'NO'}")
    cfg = report["sizes"]
    print(f"\n## timings: batch {cfg['B']}, {cfg['H']} heads x head_dim {cfg['d']}, mini-batch {cfg['mb']}")
    print(f"{'op':<44} {'T':>6} {'ms':>10} {'us/token':>10} {'TFLOP/s':>8}  note")
    for r in report["timings"]:
        ms = "skipped" if r["ms"] is None else f"{r['ms']:.3f}"
        us = "" if r["us_per_token"] is None else f"{r['us_per_token']:.4f}"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
        print(f"{r['op']:<44} {r['T']:>6} {ms:>10} {us:>10} {tf:>8}  {r['note']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; CPU under TRITON_INTERPRET=1")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock guard for the whole check")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated prefill lengths")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first loaded
    import seqzoo_plugins.kernels as K

    device = torch.device("cuda" if cuda else "cpu")
    cfg = sizes(dry_run=not cuda)
    if args.lengths:
        cfg["lengths"] = [int(x) for x in args.lengths.split(",")]
    budget = Budget(args.budget_s)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    equivalence = check_equivalence(K, cfg, device, budget)
    timings = run_timings(K, cfg, device, budget, dry_run=not cuda)
    report = dict(
        device=torch.cuda.get_device_name(device)
        if cuda
        else f"cpu (Triton interpreter), {platform.processor()}",
        torch=torch.__version__,
        sizes=cfg,
        equivalence=equivalence,
        timings=timings,
        elapsed_s=time.perf_counter() - t0,
        all_ok=all(r["ok"] for r in equivalence),
    )
    print_report(report)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
