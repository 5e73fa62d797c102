"""The conformance suite every layer runs: what every layer must satisfy (docs/concepts.md), checked on numbers.

``check_layer("my_layer", **config)`` raises ``AssertionError`` with a readable report unless the layer
satisfies every check. Plugin authors can also run the checks one by one from pytest::

    from seqzoo.testing import conformance_params

    @pytest.mark.parametrize("check", conformance_params())
    def test_my_layer(check):
        check.run("my_layer", num_heads=2)

or use the ``seqzoo_check`` fixture that the pytest plugin provides.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..contract import SequenceLayer

__all__ = ["check_layer", "CHECKS", "Check", "conformance_params", "LENGTHS", "assert_close", "scan_steps",
           "check_language_model"]

LENGTHS = (1, 7, 37, 100)
BATCH = 2


@dataclass
class Subject:
    """What a check is given: a way to build the layer (fresh, seeded) and the width."""

    build: Callable[[torch.dtype], SequenceLayer]
    d_model: int

    def layer(self, dtype=torch.float64) -> SequenceLayer:
        return self.build(dtype)

    def input(self, batch: int, length: int, dtype=torch.float64, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, length, self.d_model, generator=g, dtype=torch.float64).to(dtype)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    if b.numel() == 0:  # e.g. an empty KV cache; shapes are compared by the caller
        return 0.0
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def assert_close(got: Tensor, want: Tensor, rtol: float, what: str) -> None:
    """Relative error (max |got - want| / max |want|) at most ``rtol``, with a message saying what."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values")
    err = rel_err(got, want)
    if not err <= rtol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {rtol:.1e}")


def assert_states_close(got: dict, want: dict, rtol: float, what: str) -> None:
    if set(got) != set(want):
        raise AssertionError(f"{what}: state keys {sorted(got)} != {sorted(want)}")
    for k in want:
        if want[k].is_floating_point():
            assert_close(got[k], want[k], rtol, f"{what}, state[{k!r}]")
        elif not torch.equal(got[k], want[k]):
            raise AssertionError(f"{what}, state[{k!r}]: {got[k].tolist()} != {want[k].tolist()}")


def scan_steps(layer: SequenceLayer, x: Tensor, state=None) -> tuple[Tensor, dict]:
    """Run ``step`` token by token over x (B, T, d); the reference ``forward`` must equal."""
    if state is None:
        state = layer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape[0], 0, layer.d_model)
    return y, state


# --- the checks -----------------------------------------------------------------------------------
TOL64 = 1e-9


def check_forward_equals_steps(s: Subject) -> None:
    layer = s.layer()
    for T in LENGTHS:
        x = s.input(BATCH, T, seed=T)
        with torch.no_grad():
            y, st = layer(x)
            y_ref, st_ref = scan_steps(layer, x)
        assert_close(y, y_ref, TOL64, f"forward vs step scan, T={T}: output")
        assert_states_close(st, st_ref, TOL64, f"forward vs step scan, T={T}")


def check_state_carries_across_splits(s: Subject) -> None:
    layer = s.layer()
    T = 37
    x = s.input(BATCH, T, seed=1)
    with torch.no_grad():
        y, st = layer(x)
        for a in (0, 1, 5, 16, 17, 36, 37):
            y1, s1 = layer(x[:, :a])
            y2, s2 = layer(x[:, a:], s1)
            assert_close(torch.cat([y1, y2], 1), y, TOL64, f"split at {a} of {T}: output")
            assert_states_close(s2, st, TOL64, f"split at {a} of {T}")
        # three pieces with odd lengths
        ys, state = [], None
        for lo, hi in ((0, 3), (3, 20), (20, 37)):
            yi, state = layer(x[:, lo:hi], state)
            ys.append(yi)
        assert_close(torch.cat(ys, 1), y, TOL64, "three chunks 3 + 17 + 17: output")


def check_causality(s: Subject) -> None:
    layer = s.layer()
    T, t0 = 37, 20
    x = s.input(BATCH, T, seed=2)
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    with torch.no_grad():
        y, _ = layer(x)
        y2, _ = layer(x2)
    assert_close(y2[:, :t0], y[:, :t0], TOL64, f"causality: outputs before t={t0} changed when inputs from t={t0} did")
    if torch.equal(y2[:, t0:], y[:, t0:]):
        raise AssertionError("causality: outputs after the change did not change at all (does the layer use its input?)")


def check_batch_independence(s: Subject) -> None:
    layer = s.layer()
    x = s.input(3, 37, seed=3)
    with torch.no_grad():
        y, st = layer(x)
        for b in range(3):
            yb, sb = layer(x[b:b + 1])
            assert_close(yb, y[b:b + 1], TOL64, f"batch independence, element {b}: output")
            assert_states_close(sb, {k: v[b:b + 1] for k, v in st.items()}, TOL64, f"batch independence, element {b}")


def check_empty_sequence(s: Subject) -> None:
    layer = s.layer()
    x = s.input(BATCH, 0)
    with torch.no_grad():
        y, st = layer(x)
        init = layer.init_state(BATCH, dtype=torch.float64)
    if tuple(y.shape) != (BATCH, 0, s.d_model):
        raise AssertionError(f"T=0: expected output of shape {(BATCH, 0, s.d_model)}, got {tuple(y.shape)}")
    assert_states_close(st, init, 0.0, "T=0 returns the initial state")
    x1 = s.input(BATCH, 5, seed=4)
    with torch.no_grad():
        _, st1 = layer(x1)
        _, st2 = layer(x[:, :0], st1)
    assert_states_close(st2, st1, 0.0, "T=0 from a state returns that state")


def check_state_not_mutated(s: Subject) -> None:
    layer = s.layer()
    x = s.input(BATCH, 21, seed=5)
    with torch.no_grad():
        _, st = layer(x[:, :9])
        saved = {k: v.clone() for k, v in st.items()}
        layer(x[:, 9:], st)
        layer.step(x[:, 9], st)
    assert_states_close(st, saved, 0.0, "a call modified the state it was given")


def check_float32(s: Subject) -> None:
    layer64 = s.layer(torch.float64)
    layer32 = s.layer(torch.float32)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    x = s.input(BATCH, 37, seed=6)
    with torch.no_grad():
        y64, st64 = layer64(x)
        y32, st32 = layer32(x.float())
        ys, sts = scan_steps(layer32, x.float())
    if y32.dtype != torch.float32:
        raise AssertionError(f"float32 input gave output dtype {y32.dtype}")
    for k, v in st32.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            raise AssertionError(f"float32 input gave state[{k!r}] of dtype {v.dtype}")
    assert_close(y32, y64, 1e-4, "float32 vs float64 output")
    assert_close(ys, y32, 1e-4, "float32 forward vs step scan")


def check_gradients(s: Subject) -> None:
    layer = s.layer()
    x = s.input(1, 5, seed=7).requires_grad_(True)

    def f(inp):
        return layer(inp)[0]

    if not torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True):
        raise AssertionError("gradcheck failed")  # gradcheck raises by itself; kept for clarity
    layer.zero_grad()
    y, _ = layer(s.input(BATCH, 19, seed=8))
    (y.pow(2).sum()).backward()
    missing = [n for n, p in layer.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise AssertionError(f"parameters got no gradient: {missing}")
    bad = [n for n, p in layer.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise AssertionError(f"non-finite gradients: {bad}")


def check_state_follows_input(s: Subject) -> None:
    layer = s.layer(torch.float32)
    st = layer.init_state(BATCH, dtype=torch.float32, device="cpu")
    for k, v in st.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            raise AssertionError(f"init_state(dtype=float32) gave state[{k!r}] of dtype {v.dtype}")
        if v.device.type != "cpu":
            raise AssertionError(f"init_state(device='cpu') gave state[{k!r}] on {v.device}")
        if v.shape[:1] != (BATCH,):
            raise AssertionError(f"state[{k!r}] has shape {tuple(v.shape)}; expected the batch ({BATCH}) first")
    meta = layer.init_state(BATCH, dtype=torch.float32, device="meta")
    if set(meta) != set(st):
        raise AssertionError("init_state on device='meta' has other keys")


def _expect_error(what: str, fn: Callable[[], Any], words: tuple[str, ...] = ()) -> None:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for w in words:
            if w not in msg:
                raise AssertionError(f"bad input ({what}): the error should mention {w!r}, got: {msg}") from exc
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"bad input ({what}): expected ValueError/TypeError, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"bad input ({what}): no error was raised")


def check_bad_input(s: Subject) -> None:
    layer = s.layer()
    d = s.d_model
    x = s.input(BATCH, 6)
    with torch.no_grad():
        _, st = layer(x)
        _expect_error("rank 2 x to forward", lambda: layer(x[:, 0]), (str(d),))
        _expect_error("rank 4 x to forward", lambda: layer(x[None]), (str(d),))
        _expect_error("wrong width", lambda: layer(torch.randn(BATCH, 6, d + 1, dtype=torch.float64)), (str(d), str(d + 1)))
        _expect_error("integer x", lambda: layer(torch.ones(BATCH, 6, d, dtype=torch.int64)))
        _expect_error("rank 3 x to step", lambda: layer.step(x, st), (str(d),))
        _expect_error("state of another batch size", lambda: layer(s.input(BATCH + 1, 6), st))
        _expect_error("state of another dtype", lambda: layer(x.float(), st))
        _expect_error("state with a missing key", lambda: layer(x, dict(list(st.items())[1:]) if len(st) > 1 else {}))
        _expect_error("state from another layer", lambda: layer(x, {"not_a_key": torch.zeros(BATCH, 3, dtype=torch.float64)}))
        _expect_error("state that is not a dict", lambda: layer(x, [v for v in st.values()]))


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Subject], None]

    def run(self, name_or_factory, d_model: int | None = None, **config) -> None:
        """Run this one check on a registered layer name (or a factory ``(d_model, **config)``)."""
        self.fn(_subject(name_or_factory, d_model, config))

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("forward_equals_steps", check_forward_equals_steps),
    Check("state_carries_across_splits", check_state_carries_across_splits),
    Check("causality", check_causality),
    Check("batch_independence", check_batch_independence),
    Check("empty_sequence", check_empty_sequence),
    Check("state_not_mutated", check_state_not_mutated),
    Check("float32", check_float32),
    Check("gradients", check_gradients),
    Check("state_follows_input", check_state_follows_input),
    Check("bad_input", check_bad_input),
)}


def conformance_params() -> list:
    """``pytest.param`` objects, one per check, for ``@pytest.mark.parametrize("check", ...)``."""
    import pytest

    return [pytest.param(c, id=c.name) for c in CHECKS.values()]


def default_d_model(config: dict) -> int:
    heads = config.get("num_heads", 4)
    return 16 * heads if isinstance(heads, int) and heads > 0 else 32


def _subject(name_or_factory, d_model: int | None, config: dict) -> Subject:
    from ..registry import create_layer

    d = d_model or default_d_model(config)
    config = copy.deepcopy(config)

    def build(dtype) -> SequenceLayer:
        torch.manual_seed(0)
        if callable(name_or_factory) and not isinstance(name_or_factory, str):
            layer = name_or_factory(d, **config)
        else:
            layer = create_layer(name_or_factory, d, **config)
        layer = layer.to(dtype)
        _perturb(layer)
        return layer

    return Subject(build, d)


def _perturb(layer: SequenceLayer) -> None:
    """Move parameters that start at exact constants (ones, zeros) away from them, seeded, so that
    every term of the layer is exercised by the checks."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in layer.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            scale = p.detach().abs().mean().item() if p.numel() else 0.0
            p.add_(noise * (0.1 * scale if scale > 0 else 0.02))


def check_layer(name_or_factory, d_model: int | None = None, *, checks: list[str] | None = None,
                **config) -> dict[str, str]:
    """Run the conformance suite; raise ``AssertionError`` listing every failed check.

    Returns ``{check: "ok"}`` for each check run when all pass.
    """
    subject = _subject(name_or_factory, d_model, config)
    # Build once up front, so a bad name or config raises its own clear error.
    subject.layer()
    selected = list(CHECKS) if checks is None else checks
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    failures: dict[str, str] = {}
    for c in selected:
        try:
            CHECKS[c].fn(subject)
        except AssertionError as exc:
            failures[c] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a crash is a failure to report, not to hide
            failures[c] = f"raised {type(exc).__name__}: {exc}"
    if failures:
        label = name_or_factory if isinstance(name_or_factory, str) else getattr(name_or_factory, "__name__", "layer")
        lines = [f"{label}: {len(failures)} of {len(selected)} conformance checks failed"]
        lines += [f"  - {c}: {msg}" for c, msg in failures.items()]
        raise AssertionError("\n".join(lines))
    return {c: "ok" for c in selected}


def check_language_model(name: str, backbone: str, *, vocab_size: int = 13, d_model: int = 16, n_layers: int = 2,
                         length: int = 70, **layer_options):
    """A registered layer dropped into a backbone (``transformer`` or ``mamba``), in float64: the model's
    forward cut in two equals its forward, its first steps equal the forward's logits (1e-10), and one
    training step's gradients reach every parameter. Returns the model (for further checks)."""
    import torch.nn.functional as F

    from ..backbones import create_model

    lm = create_model(name, backbone, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                      **layer_options).double()
    ids = torch.randint(0, vocab_size, (2, length))
    cut = length // 2
    with torch.no_grad():
        want, _ = lm(ids)
        a, state = lm(ids[:, :cut])
        b, _ = lm(ids[:, cut:], state)
        torch.testing.assert_close(torch.cat([a, b], 1), want, rtol=0, atol=1e-10)
        state = lm.init_state(2)
        for t in range(5):
            logit, state = lm.step(ids[:, t], state)
            torch.testing.assert_close(logit, want[:, t], rtol=0, atol=1e-10)
    logits, _ = lm(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in lm.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if missing:
        raise AssertionError(f"{name} in the {backbone} backbone: no gradient reaches {missing}")
    return lm
