"""Native CPU kernels in C for the plugins that ship them: build, cache, load, type, and the guard that
says when a call may take the native path. This module names no layer; each plugin owns its C sources
and their Python wrappers (the Mamba plugin its decode step, the TTT plugin its decode and prefill).

A decode step on the CPU is a few large mat-vecs (the projections) and dozens of tiny ops between them,
each costing PyTorch's per-op dispatch (3-10 µs) for a few microseconds of arithmetic; a C kernel does
the tiny part in one call. A plugin declares its library once::

    LIB = native.Library("mamba", [Path(__file__).parent / "csrc" / "mamba_step.c"],
                         {"sz_mamba_step": (native.I32, [native.I64] * 6 + [native.PTR, native.I64] + [native.PTR] * 12)})

and calls ``LIB.sz_mamba_step(...)`` after ``LIB.usable(*tensors)``. The signature types every argument,
so a wrong one (a float for an integer, a tensor for a pointer) raises ``ctypes.ArgumentError`` instead
of reaching the kernel.

- Build: at the first ``available()`` (never at import), ``cc -O3 -march=native`` with ``-I`` at
  ``seqzoo/csrc`` (``seqzoo_kernel.h``: a vectorisable exp, log, silu, softplus and mat-vec), about a
  second, cached under ``$SEQZOO_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/seqzoo`` or
  ``~/.cache/seqzoo``) by a hash of the sources, the header, the flags, the compiler and the CPU.
  ``SEQZOO_NATIVE=0`` turns the kernels off; with no compiler they are off and the torch paths run (one
  log line says why).
- Trust: a cached library runs code in every process that loads it, so it is loaded only as ssh reads
  its keys: the cache folder must be a real folder (no symlink) owned by this user that no one else can
  write, and the file a regular file owned by this user that no one else can write. Otherwise the
  library is built (and loaded) in a fresh private folder for this process, and a warning says why.
- ``usable(*tensors)``: plain float32 CPU tensors, autograd off (``torch.no_grad``/``inference_mode``,
  as generation runs), no autocast, no ``torch.func`` transform, no tracing: the layers take the native
  path only then, and their torch path otherwise.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from .contract import Decoder

log = logging.getLogger(__name__)

__all__ = ["Library", "signature", "I32", "I64", "F32", "PTR", "usable", "trainable", "plain_float32", "over_rows", "require_float32_cpu",
           "plain", "keeps_methods", "step_fits", "address", "cache_dir", "trusted", "NativeDecoder",
           "optional_kernels"]

INCLUDE = Path(__file__).parent / "csrc"  # seqzoo_kernel.h
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]

#: the C types a signature is written in
I32, I64, F32, PTR = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def signature(restype, argtypes: Sequence) -> tuple:
    """A kernel's C signature: its return type and the type of every argument (``I32``, ``I64``, ``F32``,
    ``PTR``; a ``PTR`` takes an address from ``address(tensor)`` or None for NULL)."""
    allowed = (I32, I64, F32, PTR)
    if restype not in allowed or any(t not in allowed for t in argtypes):
        raise TypeError(f"expected a signature of I32, I64, F32 and PTR, got {restype}, {list(argtypes)}")
    return restype, list(argtypes)


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


def trusted(path: Path, *, folder: bool) -> bool:
    """Whether ``path`` may be trusted with code, as ssh trusts its keys: not a symlink, a folder (or a
    regular file) owned by this user, and writable by no one else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_folder() -> Path:
    """This process's private build folder (mode 0700, made fresh), for when the cache is not trusted."""
    global _PRIVATE
    if _PRIVATE is None:
        _PRIVATE = Path(tempfile.mkdtemp(prefix="seqzoo-native-"))
    return _PRIVATE


_PRIVATE: Path | None = None


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "")) or [
        c for c in (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),) if c]


def _build(compiler: list[str], sources: list[Path], target: Path) -> None:
    """Compile to a temporary name and rename: concurrent builders (compare's workers) never see half a
    file. The file is made readable and writable by its owner only before it gets its name."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        # the widest vectors this CPU has; then what every compiler takes
        for arch in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []):
            cmd = [*compiler, *FLAGS, *arch, f"-I{INCLUDE}", "-o", tmp, *map(str, sources), "-lm"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                os.chmod(tmp, 0o700)
                os.replace(tmp, target)
                return
            errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
        raise RuntimeError("; ".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Library:
    """A plugin's C kernels: ``sources`` built into one shared library at the first ``available()``,
    cached by content, loaded only from a trusted place, each function in ``signatures`` typed
    (``signature(...)``) and reachable as an attribute. Nothing is built or loaded at construction."""

    def __init__(self, name: str, sources: Sequence[Path], signatures: dict[str, tuple]):
        if not name.replace("_", "").isalnum():
            raise ValueError(f"expected a library name of letters, digits and _, got {name!r}")
        self.name = name
        self.sources = [Path(src) for src in sources]
        self.signatures = {fn: signature(*sig) for fn, sig in signatures.items()}
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def __repr__(self) -> str:
        return f"native.Library({self.name!r}, {[s.name for s in self.sources]})"

    def available(self) -> bool:
        """Whether the library is built and loaded (builds it at the first call)."""
        if not self._tried:
            self._lib, self._tried = self._load(), True
        return self._lib is not None

    def usable(self, *tensors: Tensor | None) -> bool:
        """``usable(*tensors)`` and this library available."""
        return usable(*tensors) and (self._lib is not None or self.available())

    def __getattr__(self, fn: str):
        if fn.startswith("_") or fn not in self.__dict__.get("signatures", {}):
            raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} declares no function {fn!r}")
        if self._lib is None and not self.available():
            raise RuntimeError(f"the native library {self.name!r} is unavailable (see the log); check "
                               "available() first")
        function = getattr(self._lib, fn)
        self.__dict__[fn] = function  # later calls find it without this lookup (decode calls it per token)
        return function

    def _key(self, compiler: list[str]) -> str:
        parts = [src.read_bytes() for src in self.sources]
        parts += [h.read_bytes() for h in sorted(INCLUDE.glob("*.h"))]
        parts += [" ".join(FLAGS).encode(), " ".join(compiler).encode(), _cpu_signature().encode()]
        return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]

    def _load(self) -> ctypes.CDLL | None:
        if os.environ.get("SEQZOO_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
            log.debug("seqzoo native kernels off (SEQZOO_NATIVE=0)")
            return None
        compiler = _compiler()
        if not compiler:
            log.info("seqzoo native CPU kernels unavailable: no C compiler (cc, gcc, clang); using the torch paths")
            return None
        try:
            filename = f"{self.name}-{self._key(compiler)}.so"
            folder = cache_dir()
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as err:
                log.warning("seqzoo native cache %s cannot be made (%s); building in a private folder", folder, err)
                folder = _private_folder()
            if not trusted(folder, folder=True):
                log.warning("seqzoo native cache %s is not a folder of this user that only it can write; "
                            "building in a private folder instead", folder)
                folder = _private_folder()
            target = folder / filename
            if os.path.lexists(target) and not trusted(target, folder=False):
                log.warning("seqzoo native library %s is not a file of this user that only it can write; "
                            "building in a private folder instead", target)
                target = _private_folder() / filename
            if not os.path.lexists(target):
                _build(compiler, self.sources, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as err:
            log.warning("seqzoo native CPU kernels unavailable (%s); using the torch paths", err)
            return None
        for fn, (restype, argtypes) in self.signatures.items():
            f = getattr(lib, fn)
            f.restype, f.argtypes = restype, argtypes
        return lib


def usable(*tensors: Tensor | None) -> bool:
    """Whether a native path may run on these tensors: autograd not recording (the kernels have no
    backward), no ``torch.func`` transform, no tracing, compiling or autocast, and every tensor a plain
    float32 CPU tensor."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    return trainable(*tensors)


def trainable(*tensors: Tensor | None) -> bool:
    """``usable`` for a kernel wrapped in a ``torch.autograd.Function`` with its backward: autograd may
    record; still no ``torch.func`` transform (the Function has no vmap rule), no tracing or compiling,
    and every tensor a plain float32 CPU tensor."""
    if (torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()
            or torch._C._get_tracing_state() is not None):
        return False
    return plain_float32(*tensors)


class NativeDecoder(Decoder):
    """A decoder (``SequenceLayer.decoder``) for a layer with a fused decode kernel: each step tries
    ``layer.native_step(x, state)`` when autograd does not record (the kernels have no backward), which
    returns None where its kernel does not apply, and runs ``layer.step`` then. The layer checks once,
    when it makes the decoder, what does not change from token to token (its options, a C compiler,
    subclass overrides of the methods the kernel stands in for)."""

    def step(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        if not torch.is_grad_enabled():
            out = self.layer.native_step(x, state)
            if out is not None:
                return out
        return self.layer.step(x, state)


def address(t: Tensor | None) -> int | None:
    """A tensor's data pointer for a ``PTR`` argument, None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


_PLAIN_TYPES = (Tensor, nn.Parameter)  # no subclass (FakeTensor, DTensor, ...): those may have no memory


#: (process id, workers, pool) of ``over_rows``' threads: a forked child makes its own pool rather than rely
#: on a copy of its parent's
_POOL: tuple[int, int, concurrent.futures.ThreadPoolExecutor] | None = None


def over_rows(call, rows: int) -> list:
    """``call(row0, row1)`` on disjoint ranges covering [0, rows), one per torch thread, in parallel: a
    kernel call through ctypes releases the GIL, so single-threaded kernels over independent rows (heads,
    batch elements) use every core torch would. Returns each call's result, in order of the ranges."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * i // threads for i in range(threads + 1)]
    if threads == 1:
        return [call(0, rows)]
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < threads:
        _POOL = (os.getpid(), threads, concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="seqzoo-native"))
    futures = [_POOL[2].submit(call, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    return [f.result() for f in futures]


def plain_float32(*tensors: Tensor | None) -> bool:
    """Whether every tensor is None or a plain float32 CPU tensor: ``usable`` without its checks of the
    context, for a hot path's further tensors once ``usable`` has passed in the same call."""
    f32 = torch.float32
    for t in tensors:  # (a loop, not all() over a generator: this runs per token)
        if t is not None and (type(t) not in _PLAIN_TYPES or t.dtype is not f32 or not t.is_cpu):
            return False
    return True


def require_float32_cpu(name: str, tensors: dict[str, Tensor | None]) -> None:
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




def optional_kernels(what: str, fallback: str, **paths: str) -> dict | None:
    """Another package's kernels, or None (logged) unless every one imports: ``paths`` maps a name to
    ``"module:attribute"`` (or ``"module"``: the module itself, e.g. a compiled extension that must load).
    A layer calls this (cached) only for the tensors the kernels serve, so nothing is imported otherwise."""
    import importlib

    found = {}
    try:
        for name, path in paths.items():
            module, _, attribute = path.partition(":")
            loaded = importlib.import_module(module)
            found[name] = getattr(loaded, attribute) if attribute else loaded
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        log.info("%s unavailable (%s); using %s", what, exc, fallback)
        return None
    return found
