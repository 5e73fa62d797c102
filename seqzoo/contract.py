"""The one contract every sequence layer keeps: an initial state, an update rule, an output rule.

A layer maps ``x`` of shape ``(B, T, d_model)`` to ``y`` of the same shape and carries a state, a flat
``dict[str, Tensor]``, from one call to the next. ``forward`` is the fast parallel or chunked form,
``step`` the update rule plus output rule for one token; both return a new state and never modify the
one they were given.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

State = dict[str, Tensor]

__all__ = ["State", "SequenceLayer", "Decoder", "linear_weights"]


def linear_weights(module: nn.Module) -> int:
    """Scalars in the weights of the ``nn.Linear`` modules under ``module`` (a shared module once)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


class Decoder:
    """Steps a layer for ``batch_size`` sequences: ``step(x, state)`` as ``layer.step`` (see
    ``SequenceLayer.decoder``). ``LanguageModel.generate`` and the benchmarks decode through it."""

    def __init__(self, layer: nn.Module, batch_size: int):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"expected batch_size to be a positive int, got {batch_size!r}")
        self.layer, self.batch_size = layer, batch_size

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        return self.layer.step(x, state)


class SequenceLayer(nn.Module):
    """Base class of every layer: ``init_state``, ``forward``, ``step``, ``state_size``.

    Subclasses call ``self.check_input(x, state)`` (or ``step=True`` in ``step``) first; it validates
    shapes, dtypes and devices and returns the state to use (the initial one when ``state`` is None).
    """

    #: For state tensors whose shape grows with the sequence (a KV cache), the dims that may differ
    #: from ``init_state``'s: ``{"k": (2,), "v": (2,)}``.
    state_dynamic_dims: ClassVar[dict[str, tuple[int, ...]]] = {}

    def __init__(self, d_model: int):
        super().__init__()
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
            raise ValueError(f"expected d_model to be a positive int, got {d_model!r}")
        self.d_model = d_model

    # --- the contract --------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """The state before any token: a flat dict of tensors with leading batch dimension."""
        raise NotImplementedError

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Process ``x`` of shape (B, T, d_model) from ``state``; return ``(y, new_state)``."""
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Process one token ``x`` of shape (B, d_model); return ``(y, new_state)``."""
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:
        """Scalars held in the state per batch element after ``seq_len`` tokens."""
        raise NotImplementedError

    def decoder(self, batch_size: int) -> Decoder:
        """An object that steps this layer token by token for ``batch_size`` sequences, as fast as the
        layer can: ``decoder.step(x, state)`` equals ``step(x, state)``. This default calls ``step``; a
        layer with a fused decode kernel returns one that checks once what the kernel needs (and falls
        back to ``step`` where it does not apply). Make a new one after changing the layer's structure
        (hooks, modules); parameters may change in place."""
        return Decoder(self, batch_size)

    def flops(self, seq_len: int) -> float:
        """2T·Σ(weights of nn.Linear): forward FLOPs of one sequence of T tokens in the projections.

        (The speed harness reads this method: a multiply-add counts 2; the first line of its
        docstring is the formula it prints.) This default counts only the layer's ``nn.Linear``
        weights; a layer whose update or output rule multiplies more (attention over the past, a
        matrix state, an inner model) overrides it and adds that, as the built-in layers do."""
        return 2.0 * seq_len * linear_weights(self)

    # --- validation shared by every layer ------------------------------------------------------
    def check_input(self, x: Tensor, state: State | None = None, *, step: bool = False) -> State:
        """Validate ``x`` (and ``state``) and return the state to start from."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected x to be a torch.Tensor, got {type(x).__name__}")
        want = f"(B, {self.d_model})" if step else f"(B, T, {self.d_model})"
        ndim = 2 if step else 3
        if x.ndim != ndim or x.shape[-1] != self.d_model:
            raise ValueError(f"{name}: expected x of shape {want}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point x, got dtype {x.dtype}")
        batch = x.shape[0]
        if state is None:
            if step:
                raise ValueError(f"{name}.step needs a state; start from init_state(batch_size)")
            return self.init_state(batch, device=x.device, dtype=x.dtype)
        self.check_state(state, batch, device=x.device, dtype=x.dtype)
        return state

    def check_state(self, state: State, batch_size: int, *, device, dtype) -> None:
        """Raise unless ``state`` has the keys, shapes, dtypes and device this layer's states have."""
        name = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{name}: expected state to be a dict[str, Tensor], got {type(state).__name__}")
        template = self._state_template(batch_size, dtype)
        if len(state) != len(template) or any(key not in state for key in template):
            raise ValueError(
                f"{name}: expected a state with keys {sorted(template)}, got keys {sorted(state)} "
                "(a state from another layer?)"
            )
        dynamic = self.state_dynamic_dims
        device = torch.device(device)
        on_cpu = device.type == "cpu"  # Tensor.is_cpu is cheaper than building and comparing a device
        for key, want in template.items():
            got = state[key]
            if not isinstance(got, Tensor):
                raise TypeError(f"{name}: state[{key!r}] must be a Tensor, got {type(got).__name__}")
            if got.shape != want.shape:
                free = dynamic.get(key, ())
                if got.ndim != want.ndim or any(
                    g != w and i not in free for i, (g, w) in enumerate(zip(got.shape, want.shape))
                ):
                    shown = tuple("*" if i in free else s for i, s in enumerate(want.shape))
                    raise ValueError(
                        f"{name}: expected state[{key!r}] of shape {shown} for batch size {batch_size}, "
                        f"got {tuple(got.shape)}"
                    )
            if got.dtype != want.dtype:
                raise TypeError(
                    f"{name}: expected state[{key!r}] of dtype {want.dtype} to go with x of dtype "
                    f"{dtype}, got {got.dtype}"
                )
            if (not got.is_cpu) if on_cpu else (got.device != device):
                raise ValueError(
                    f"{name}: state[{key!r}] is on {got.device} but x is on {device}; move both to one device"
                )

    def _state_template(self, batch_size: int, dtype) -> State:
        """``init_state`` on the meta device, cached per (batch size, dtype): validation in ``step``
        runs once per token and must cost next to nothing."""
        cache = self.__dict__.setdefault("_seqzoo_state_templates", {})
        key = (batch_size, dtype)
        if key not in cache:
            cache[key] = self.init_state(batch_size, device="meta", dtype=dtype)
        return cache[key]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"
