"""Native CPU kernels in C (``seqzoo/csrc/decode.c``): fused decode steps and the TTT layers' prefill,
built once per machine with the system C compiler.

A decode step on the CPU is a few large mat-vecs (the projections) and dozens of tiny ops between them,
each costing PyTorch's per-op dispatch (3-10 µs, several times that with the caches cold after the
mat-vecs) for a few microseconds of arithmetic. The kernels here do the tiny part in one call: Mamba's
conv, x_proj, dt_proj and selective-state update, TTT-Linear's inner step. The projections are read
directly only while they are bare ``nn.Linear``/``nn.LayerNorm`` modules without hooks (``plain``);
otherwise the layers call them, or take their torch path. The TTT layers' prefill runs its whole
mini-batches through one call (``ttt_linear_dual``, ``ttt_mlp_dual``).

- ``available()``: the library is built (or was built before) and loads. The build runs at the first
  call, never at import: ``cc -O3 -march=native``, about a second, cached under ``$SEQZOO_CACHE_DIR``
  (default ``$XDG_CACHE_HOME/seqzoo`` or ``~/.cache/seqzoo``) by a hash of the source, the compiler
  and the CPU. ``SEQZOO_NATIVE=0`` turns the kernels off; with no compiler they are off and the torch
  paths run (one log line says why).
- ``usable(*tensors)``: plain float32 CPU tensors, autograd off (``torch.no_grad``/``inference_mode``,
  as generation runs), no autocast, no ``torch.func`` transform, no tracing: the layers take the native
  path only then, and their torch path otherwise.

The cached library is loaded from the cache folder: point ``SEQZOO_CACHE_DIR`` only at a folder that
others cannot write.

Every kernel is tested against the layer's torch path (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

log = logging.getLogger(__name__)

__all__ = ["available", "usable", "plain", "keeps_methods", "mamba_step", "ttt_linear_token", "ttt_mlp_token", "ttt_linear_dual", "ttt_mlp_dual", "cache_dir"]

SOURCE = Path(__file__).parent / "csrc" / "decode.c"
MAX_DIM = 1024  # MAX_DIM of decode.c: the longest head the TTT decode kernels take
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]

_lib: ctypes.CDLL | None = None
_tried = False

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "sz_mamba_step": (_i32, [_i64] * 6 + [_ptr, _i64] + [_ptr] * 12),
    "sz_ttt_linear_dual": (_i32, [_i64] * 5 + [_ptr] * 3 + [_i64] * 3 + [_ptr] * 4 + [_f32] + [_ptr] * 3),
    "sz_ttt_mlp_dual": (_i32, [_i64] * 5 + [_ptr] * 3 + [_i64] * 3 + [_ptr] * 4 + [_f32] + [_ptr] * 5),
    "sz_ttt_mlp_token": (_i32, [_i64] * 4 + [_ptr] * 6 + [_f32, _ptr, _ptr, _i64] + [_ptr] * 10
                         + [_f32, _ptr, _ptr, _f32] + [_ptr] * 9),
    "sz_ttt_linear_token": (_i32, [_i64] * 4 + [_ptr] * 6 + [_f32, _ptr, _ptr, _i64] + [_ptr] * 6
                            + [_f32, _ptr, _ptr, _f32] + [_ptr] * 5),
}


def cache_dir() -> Path:
    root = os.environ.get("SEQZOO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "seqzoo"
    )
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: list[str], target: Path) -> None:
    """Compile to a temporary name and rename: concurrent builders (compare's workers) never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        # the widest vectors this CPU has; then what every compiler takes
        for arch in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []):
            cmd = [*compiler, *FLAGS, *arch, "-o", tmp, str(SOURCE), "-lm"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
        raise RuntimeError("; ".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("SEQZOO_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        log.debug("seqzoo native kernels off (SEQZOO_NATIVE=0)")
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [
        c for c in (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),) if c]
    if not compiler:
        log.info("seqzoo native CPU kernels unavailable: no C compiler (cc, gcc, clang); using the torch paths")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), " ".join(compiler).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"decode-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as err:
        log.warning("seqzoo native CPU kernels unavailable (%s); using the torch paths", err)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them at the first call)."""
    global _lib, _tried
    if not _tried:
        _lib, _tried = _load(), True
    return _lib is not None


def _library() -> ctypes.CDLL:
    if _lib is None and not available():
        raise RuntimeError("seqzoo native CPU kernels are unavailable (see the log); check native.available() first")
    return _lib


def usable(*tensors: Tensor | None) -> bool:
    """Whether the native path may run on these tensors: autograd not recording (the kernels have no
    backward), no ``torch.func`` transform, no tracing, compiling or autocast, and every tensor a plain
    float32 CPU tensor."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not (_lib is not None or available()):
        return False
    if (torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()
            or torch._C._get_tracing_state() is not None):
        return False
    return plain_float32(*tensors)


_PLAIN_TYPES = (Tensor, nn.Parameter)  # no subclass (FakeTensor, DTensor, ...): those may have no memory


def plain_float32(*tensors: Tensor | None) -> bool:
    """Whether every tensor is None or a plain float32 CPU tensor: ``usable`` without its checks of the
    context, for a hot path's further tensors once ``usable`` has passed in the same call."""
    f32 = torch.float32
    for t in tensors:  # (a loop, not all() over a generator: this runs per token)
        if t is not None and (type(t) not in _PLAIN_TYPES or t.dtype is not f32 or not t.is_cpu):
            return False
    return True


def _require_float32_cpu(name: str, tensors: dict[str, Tensor | None]) -> None:
    """The kernels read raw float32 memory: anything else must be refused, not reinterpreted."""
    bad = {k: (t.dtype, t.device.type) for k, t in tensors.items()
           if t is not None and (t.dtype is not torch.float32 or not t.is_cpu)}
    if bad:
        raise TypeError(f"{name}: expected float32 CPU tensors, got {bad}")


_KEEPS: dict[tuple[type, type], bool] = {}


def keeps_methods(cls: type, reference: type, names: tuple[str, ...]) -> bool:
    """Whether ``cls`` overrides none of ``reference``'s methods ``names`` (the ones a native path stands
    in for: a subclass that changes one of them gets the torch path). Once per class."""
    key = (cls, reference)
    if key not in _KEEPS:
        _KEEPS[key] = all(getattr(cls, n) is getattr(reference, n) for n in names)
    return _KEEPS[key]


def plain(*modules: nn.Module, kind: type = nn.Linear) -> bool:
    """Whether these are bare ``kind`` modules (``nn.Linear``, ``nn.LayerNorm``) no hook watches, with their
    ``weight`` and ``bias`` registered (either may be None), so a kernel may read ``_parameters`` instead
    of calling them (a hooked or wrapped module must be called, and a deleted parameter raise there)."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    for m in modules:
        params = m._parameters
        if (type(m) is not kind or m._forward_hooks or m._forward_pre_hooks or "weight" not in params
                or "bias" not in params):
            return False
    return True


def step_fits(layer: nn.Module, x, state) -> bool:
    """Whether ``x`` and ``state`` are what ``layer.check_input(x, state, step=True)`` accepts, as plain
    float32 CPU tensors (``usable``), each state tensor of exactly its template's shape: the hot path's
    check, which raises nothing (inputs that fail it go to the layer's torch path, whose validation
    names what is wrong). The template's (key, shape, dtype) triples are kept per batch size."""
    if not (isinstance(x, Tensor) and usable(x) and x.ndim == 2 and x.shape[1] == layer.d_model):
        return False
    batch_size = x.shape[0]
    specs = layer.__dict__.setdefault("_seqzoo_native_state_specs", {})
    spec = specs.get(batch_size)
    if spec is None:
        template = layer._state_template(batch_size, torch.float32)
        spec = specs[batch_size] = tuple((key, t.shape, t.dtype) for key, t in template.items())
    if type(state) is not dict or len(state) != len(spec):
        return False
    for key, shape, dtype in spec:
        t = state.get(key)
        if type(t) is not Tensor or t.shape != shape or t.dtype is not dtype or not t.is_cpu:
            return False
    return True


def mamba_step(xz: Tensor, conv_state: Tensor, h: Tensor, conv_w: Tensor, conv_b: Tensor | None,
               x_proj_w: Tensor, dt_w: Tensor, dt_b: Tensor, A_log: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mamba's decode step between ``in_proj`` and ``out_proj`` (as ``Mamba.step``'s torch path):
    xz (B, 2·d_inner) = in_proj(u), conv_state (B, d_inner, W ≥ max(K−1, 1)), h (B, d_inner, d_state), conv_w
    (d_inner, 1, K), x_proj_w (R + 2·d_state, d_inner), dt_w (d_inner, R), dt_b, D (d_inner,), A_log
    (d_inner, d_state) -> y = (C·h' + D·xc) ⊙ silu(z) (B, d_inner), the new conv_state and h'."""
    Bsz, two_d = xz.shape
    Dn, N = A_log.shape
    K, W, R = conv_w.shape[-1], conv_state.shape[-1], dt_w.shape[-1]
    tensors = (xz, conv_state, h, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D)
    want = ((Bsz, 2 * Dn), (Bsz, Dn, W), (Bsz, Dn, N), (Dn, 1, K), (Dn,), (R + 2 * N, Dn), (Dn, R), (Dn,), (Dn, N),
            (Dn,))
    got = tuple(None if t is None else t.shape for t in tensors)
    names = ("xz", "conv_state", "h", "conv_w", "conv_b", "x_proj_w", "dt_w", "dt_b", "A_log", "D")
    if got != tuple(None if t is None else w for t, w in zip(tensors, want)) or K < 1 or W < max(K - 1, 1) or (
            dt_b is None):
        raise ValueError("mamba_step: inconsistent shapes " + ", ".join(
            f"{n} {tuple(g)}" for n, g in zip(names, got) if g is not None)
            + f" (a conv of K >= 1 taps, a conv state of W >= {max(K - 1, 1)}, a dt bias)")
    _require_float32_cpu("mamba_step", dict(zip(names, tensors)))
    # every pointer below is of a tensor bound to a name here, alive until the call returns
    return _mamba_step(xz, *(None if t is None else t.contiguous() for t in tensors[1:]))


def _mamba_step(xz: Tensor, conv_state: Tensor, h: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor,
                dt_w: Tensor, dt_b: Tensor, A_log: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel call of ``mamba_step`` on inputs its caller has checked as ``mamba_step`` does (shapes,
    float32 CPU, a dt bias; contiguous, but for xz, whose rows may be strided)."""
    if xz.stride(-1) != 1:
        xz = xz.contiguous()
    Bsz, two_d = xz.shape
    Dn, N = A_log.shape
    K, W, R = conv_w.shape[-1], conv_state.shape[-1], dt_w.shape[-1]
    y = xz.new_empty((Bsz, Dn))
    conv_out, h_out = torch.empty_like(conv_state), torch.empty_like(h)
    status = _library().sz_mamba_step(
        Bsz, Dn, N, R, W, K, xz.data_ptr(), xz.stride(0) if Bsz > 1 else two_d, conv_state.data_ptr(),
        conv_out.data_ptr(), conv_w.data_ptr(), None if conv_b is None else conv_b.data_ptr(), x_proj_w.data_ptr(),
        dt_w.data_ptr(), dt_b.data_ptr(), A_log.data_ptr(), D.data_ptr(), h.data_ptr(), h_out.data_ptr(),
        y.data_ptr())
    if status:
        raise MemoryError("mamba_step: the kernel could not allocate its workspace")
    return y, conv_out, h_out


def _address(t: Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes, None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


def _token_inputs(name: str, q: Tensor, x: Tensor, p: int, named: list[tuple[str, Tensor, tuple]], ln_w: Tensor,
                  ln_b: Tensor, lr_w, lr_b, rope, token_idx, post_w, post_b) -> list[Tensor | None]:
    """Validate a TTT decode kernel's inputs: q (B, H, d), x (B, C), the named (tensor, shape) pairs (k
    and v first, then the weights), and the per-head / optional ones. Returns, contiguous (None stays
    None): q, k, v, x, the weights, ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b."""
    Bsz, H, d = q.shape
    C = x.shape[-1]
    n_rope = rope.shape[0] if rope is not None else 0
    n_tok = token_idx.shape[0] if token_idx is not None else 0
    labels = ("x", *(n for n, _, _ in named), "ln_w", "ln_b", "lr_w", "lr_b", "rope", "token_idx", "post_w", "post_b")
    tensors = (x, *(t for _, t, _ in named), ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    want = ((Bsz, H * d), *(s for _, _, s in named), (H, d), (H, d), (H, 1, C), (H, 1), (n_rope, d // 2, 2),
            (n_tok,), (C,), (C,))
    got = tuple(None if t is None else t.shape for t in tensors)
    if got != tuple(None if t is None else w for t, w in zip(tensors, want)) or (lr_w is None) != (lr_b is None) or (
            rope is not None and not 0 <= p < n_rope) or (token_idx is not None and not 0 <= p < n_tok):
        wrong = {n: tuple(g) for n, g, w, t in zip(labels, got, want, tensors) if t is not None and g != w}
        expected = {n: tuple(w) for n, w, t in zip(labels, want, tensors) if t is not None}
        raise ValueError(f"{name}: for q {tuple(q.shape)} and x {tuple(x.shape)}, got shapes {wrong} "
                         f"(expected {expected}), position {p}")
    if d > MAX_DIM or (rope is not None and d % 2):
        raise ValueError(f"{name}: head_dim {d} must be at most {MAX_DIM} (and even with RoPE)")
    _require_float32_cpu(name, {"q": q, **dict(zip(labels, tensors))})
    # the callers bind every returned tensor to a name, alive until their kernel call returns
    q, x, k, v, *rest = (None if t is None else t.contiguous() for t in (q, *tensors))
    return [q, k, v, x, *rest]


def ttt_linear_token(q: Tensor, k: Tensor, v: Tensor, x: Tensor, lr_w: Tensor | None, lr_b: Tensor | None,
                     lr_base: float, rope: Tensor | None, token_idx: Tensor | None, p: int, W: Tensor, b: Tensor,
                     GW: Tensor, Gb: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, commit: bool,
                     post_norm: tuple[Tensor, Tensor, float] | None = None,
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One TTT-Linear token with the inner LayerNorm (as ``TTTLayer.step`` with ``ttt_linear_step``):
    q, k, v (B, H, d) before RoPE; x (B, C) the layer input, lr_w (H, 1, C) / lr_b (H, 1) the η gate
    (None: the gate is ``lr_base``), ``lr_base`` = ttt_base_lr / d; rope (b, d/2, 2) the (cos, sin)
    of the positions in a mini-batch, or None; token_idx (b,) the learnable offsets or None, p the
    position in the mini-batch; W/GW (B, H, d, d), b/Gb (B, H, 1, d), ln_w/ln_b (H, d);
    ``post_norm`` = (weight (C,), bias (C,), eps): the layer's output LayerNorm, applied to each
    batch element's z. Returns Z (B, H, d), G'_W, G'_b and, when ``commit``, W̄ and b̄ (else None)."""
    Bsz, H, d = q.shape
    post_w, post_b, post_eps = post_norm if post_norm is not None else (None, None, 0.0)
    q, k, v, x, W, b, GW, Gb, ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b = _token_inputs(
        "ttt_linear_token", q, x, p,
        [("k", k, q.shape), ("v", v, q.shape), ("W", W, (Bsz, H, d, d)), ("b", b, (Bsz, H, 1, d)),
         ("GW", GW, (Bsz, H, d, d)), ("Gb", Gb, (Bsz, H, 1, d))],
        ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    rows = (Bsz, H * d)
    Z, GW, Gb, W, b = _ttt_linear_token(q.view(rows), k.view(rows), v.view(rows), x, H, lr_w, lr_b, lr_base, rope,
                                        token_idx, p, W, b, GW, Gb, ln_w, ln_b, eps, commit, post_w, post_b, post_eps)
    return Z.view(Bsz, H, d), GW, Gb, W, b


def _ttt_linear_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, W, b, GW, Gb, ln_w, ln_b, eps, commit,
                      post_w, post_b, post_eps):
    """The kernel call of ``ttt_linear_token`` on inputs its caller has checked as ``_token_inputs`` does
    (shapes, float32 CPU, contiguous, the position inside the tables), with q, k, v as rows (B, H·d) of
    H heads; Z comes back as such rows."""
    Bsz, C = q.shape
    d = C // H
    ptr = _address
    Z = torch.empty_like(q)
    GW_out, Gb_out = torch.empty_like(GW), torch.empty_like(Gb)
    W_out = torch.empty_like(W) if commit else None
    b_out = torch.empty_like(b) if commit else None
    status = _library().sz_ttt_linear_token(
        Bsz * H, H, d, x.shape[-1], q.data_ptr(), k.data_ptr(), v.data_ptr(), x.data_ptr(), ptr(lr_w), ptr(lr_b),
        lr_base, ptr(rope), ptr(token_idx), p, W.data_ptr(), b.data_ptr(), GW.data_ptr(), Gb.data_ptr(),
        ln_w.data_ptr(), ln_b.data_ptr(), eps, ptr(post_w), ptr(post_b), post_eps, Z.data_ptr(), GW_out.data_ptr(),
        Gb_out.data_ptr(), ptr(W_out), ptr(b_out))
    if status:
        raise RuntimeError(f"ttt_linear_token: the kernel refused head_dim {d}")
    return Z, GW_out, Gb_out, W_out, b_out


def ttt_mlp_token(q: Tensor, k: Tensor, v: Tensor, x: Tensor, lr_w: Tensor | None, lr_b: Tensor | None,
                  lr_base: float, rope: Tensor | None, token_idx: Tensor | None, p: int, W: list[Tensor],
                  G: list[Tensor], ln_w: Tensor, ln_b: Tensor, eps: float, commit: bool,
                  post_norm: tuple[Tensor, Tensor, float] | None = None,
                  ) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """One TTT-MLP token with the inner LayerNorm (as ``TTTLayer.step`` with ``ttt_mlp_step``), the other
    arguments as ``ttt_linear_token``: W = [W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d),
    b2 (B, H, 1, d)] and G their accumulated gradients. Returns Z (B, H, d), G' (a list like G) and,
    when ``commit``, W̄ (a list like W, else None)."""
    Bsz, H, d = q.shape
    F = 4 * d
    post_w, post_b, post_eps = post_norm if post_norm is not None else (None, None, 0.0)
    if len(W) != 4 or len(G) != 4:
        raise ValueError(f"ttt_mlp_token: expected W = [W1, b1, W2, b2] and G likewise, got {len(W)} and {len(G)}")
    shapes = [(Bsz, H, d, F), (Bsz, H, 1, F), (Bsz, H, F, d), (Bsz, H, 1, d)]
    names = ("W1", "b1", "W2", "b2")
    checked = _token_inputs(
        "ttt_mlp_token", q, x, p,
        [("k", k, q.shape), ("v", v, q.shape), *zip(names, W, shapes), *zip(("G" + n for n in names), G, shapes)],
        ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    q, k, v = (t.view(Bsz, H * d) for t in checked[:3])
    x = checked[3]
    ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b = checked[12:]
    Z, G_out, W_out = _ttt_mlp_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, checked[4:8], checked[8:12],
                                     ln_w, ln_b, eps, commit, post_w, post_b, post_eps)
    return Z.view(Bsz, H, d), G_out, W_out


def _ttt_mlp_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, W, G, ln_w, ln_b, eps, commit, post_w,
                   post_b, post_eps):
    """The kernel call of ``ttt_mlp_token`` on inputs its caller has checked as ``_token_inputs`` does, with
    q, k, v as rows (B, H·d) of H heads; Z comes back as such rows."""
    Bsz, C = q.shape
    d = C // H
    ptr = _address
    Z = torch.empty_like(q)
    G_out = [torch.empty_like(t) for t in G]
    W_out = [torch.empty_like(t) for t in W] if commit else None
    status = _library().sz_ttt_mlp_token(
        Bsz * H, H, d, x.shape[-1], q.data_ptr(), k.data_ptr(), v.data_ptr(), x.data_ptr(), ptr(lr_w), ptr(lr_b),
        lr_base, ptr(rope), ptr(token_idx), p, *(t.data_ptr() for t in W), *(t.data_ptr() for t in G),
        ln_w.data_ptr(), ln_b.data_ptr(), eps, ptr(post_w), ptr(post_b), post_eps, Z.data_ptr(),
        *(t.data_ptr() for t in G_out), *(ptr(t) for t in (W_out or [None] * 4)))
    if status:
        raise MemoryError("ttt_mlp_token: the kernel could not allocate its workspace")
    return Z, G_out, W_out


def _dual_inputs(name: str, XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, weights: dict,
                 ln_w: Tensor, ln_b: Tensor, mini_batch_size: int) -> tuple:
    """Validate the dual-form kernels' inputs (weights: name -> (tensor, expected shape)); returns XQ, XK,
    XV with shared strides and unit stride within a head, and the other inputs contiguous."""
    Bsz, H, T, d = XQ.shape
    bs = mini_batch_size
    expected = [(XK, XQ.shape), (XV, XQ.shape), (lr, (Bsz, H, T)), (tok, (bs,)), (ln_w, (H, d)), (ln_b, (H, d)),
                *weights.values()]
    wrong = [tuple(t.shape) for t, shape in expected if t.shape != shape]
    if wrong or bs < 1 or T % bs:
        raise ValueError(f"{name}: for XQ {tuple(XQ.shape)} and mini-batches of {bs}, got shapes {wrong} "
                         f"(expected {[tuple(s) for _, s in expected]}; T a multiple of b)")
    _require_float32_cpu(name, dict(XQ=XQ, XK=XK, XV=XV, lr=lr, tok=tok, ln_w=ln_w, ln_b=ln_b,
                                    **{k: t for k, (t, _) in weights.items()}))
    if XQ.stride(-1) != 1 or XK.stride() != XQ.stride() or XV.stride() != XQ.stride():
        XQ, XK, XV = XQ.contiguous(), XK.contiguous(), XV.contiguous()
    return XQ, XK, XV, lr.contiguous(), tok.contiguous(), ln_w.contiguous(), ln_b.contiguous()


def ttt_linear_dual(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W: Tensor, b: Tensor,
                    ln_w: Tensor, ln_b: Tensor, mini_batch_size: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear with the inner LayerNorm over whole mini-batches, dual form, without autograd (as
    ``seqzoo_plugins.ttt.linear.ttt_linear_dual`` for T a multiple of b): XQ, XK, XV (B, H, T, d) after
    RoPE, lr (B, H, T), tok (b,), W (B, H, d, d), b (B, H, 1, d), ln_w/ln_b (H, d). Returns Z (B, H, T, d)
    (a view of a (B, T, H, d) tensor, the layout the output projection reads) and the new W and b."""
    Bsz, H, T, d = XQ.shape
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs(
        "ttt_linear_dual", XQ, XK, XV, lr, tok, {"W": (W, (Bsz, H, d, d)), "b": (b, (Bsz, H, 1, d))}, ln_w, ln_b,
        mini_batch_size)
    W_out, b_out = (t.clone(memory_format=torch.contiguous_format) for t in (W, b))
    Z = XQ.new_empty((Bsz, T, H, d))
    sB, sH, sT, _ = XQ.stride()
    status = _library().sz_ttt_linear_dual(
        Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
        tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W_out.data_ptr(), b_out.data_ptr(), Z.data_ptr())
    if status:
        raise MemoryError("ttt_linear_dual: the kernel could not allocate its workspace")
    return Z.transpose(1, 2), W_out, b_out


def ttt_mlp_dual(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W1: Tensor, b1: Tensor, W2: Tensor,
                 b2: Tensor, ln_w: Tensor, ln_b: Tensor, mini_batch_size: int,
                 eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP with the inner LayerNorm over whole mini-batches, dual form, without autograd (as
    ``seqzoo_plugins.ttt.mlp.ttt_mlp_dual`` for T a multiple of b): W1 (B, H, d, 4d), b1 (B, H, 1, 4d),
    W2 (B, H, 4d, d), b2 (B, H, 1, d), the rest as ``ttt_linear_dual``. Returns Z (B, H, T, d) (a view
    of a (B, T, H, d) tensor) and the new W1, b1, W2, b2."""
    Bsz, H, T, d = XQ.shape
    F = 4 * d
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs(
        "ttt_mlp_dual", XQ, XK, XV, lr, tok,
        {"W1": (W1, (Bsz, H, d, F)), "b1": (b1, (Bsz, H, 1, F)), "W2": (W2, (Bsz, H, F, d)), "b2": (b2, (Bsz, H, 1, d))},
        ln_w, ln_b, mini_batch_size)
    W1_out, b1_out, W2_out, b2_out = (t.clone(memory_format=torch.contiguous_format) for t in (W1, b1, W2, b2))
    Z = XQ.new_empty((Bsz, T, H, d))
    sB, sH, sT, _ = XQ.stride()
    status = _library().sz_ttt_mlp_dual(
        Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
        tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W1_out.data_ptr(), b1_out.data_ptr(),
        W2_out.data_ptr(), b2_out.data_ptr(), Z.data_ptr())
    if status:
        raise MemoryError("ttt_mlp_dual: the kernel could not allocate its workspace")
    return Z.transpose(1, 2), W1_out, b1_out, W2_out, b2_out
