"""The backbones of the TTT paper (Transformer and Mamba blocks) around any layer, and a language model.

Blocks are exactly ttt-lm-pytorch's ``Block``: a pre-norm residual around the sequence layer, then a
pre-norm residual SwiGLU; the Mamba backbone adds a residual pre-conv (RMSNorm, depthwise causal conv)
before them and builds the layer with ``share_qk=True, use_gate=True`` where it has those options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import State
from .nn import RMSNorm, SwiGLU, causal_conv, causal_conv_step, conv_state_shape
from .registry import create_layer, layer_spec

__all__ = ["Block", "PreConv", "LanguageModel", "ModelConfig", "create_model", "BACKBONES"]

BACKBONES = ("transformer", "mamba")


class PreConv(nn.Module):
    """The Mamba backbone's residual branch before the layer: depthwise causal conv of RMSNorm(h)."""

    def __init__(self, d_model: int, kernel: int = 4, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=True, padding=kernel - 1)

    def forward(self, h: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return causal_conv(self.conv, self.norm(h), conv_state)

    def step(self, h: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
        return causal_conv_step(self.conv, self.norm(h), conv_state)


class Block(nn.Module):
    """h += [conv(RMSNorm(h))]; h += layer(RMSNorm(h)); h += SwiGLU(RMSNorm(h)) (the last if mlp)."""

    def __init__(self, layer: nn.Module, d_model: int, *, backbone: str = "transformer", mlp: bool = True,
                 intermediate_size: int = 0, norm_eps: float = 1e-6, conv_kernel: int = 4):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"expected backbone in {BACKBONES}, got {backbone!r}")
        self.backbone = backbone
        self.conv = PreConv(d_model, conv_kernel, norm_eps) if backbone == "mamba" else None
        self.seq_norm = RMSNorm(d_model, norm_eps)
        self.seq_modeling_block = layer
        self.ffn_norm = RMSNorm(d_model, norm_eps) if mlp else None
        self.mlp = SwiGLU(d_model, intermediate_size) if mlp else None

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = {f"layer.{k}": v for k, v in
                 self.seq_modeling_block.init_state(batch_size, device=device, dtype=dtype).items()}
        if self.conv is not None:
            state["preconv"] = torch.zeros(conv_state_shape(self.conv.conv, batch_size), device=device,
                                           dtype=dtype)
        return state

    def _split(self, state: State) -> tuple[State, Tensor | None]:
        inner = {k[len("layer."):]: v for k, v in state.items() if k.startswith("layer.")}
        return inner, state.get("preconv")

    def _join(self, inner: State, conv: Tensor | None) -> State:
        out = {f"layer.{k}": v for k, v in inner.items()}
        if conv is not None:
            out["preconv"] = conv
        return out

    def _branch_input(self, h: Tensor) -> Tensor:
        """The residual stream in the block's own dtype: a stream kept in float32 (``residual_in_fp32``)
        is rounded to a bfloat16 block's dtype before each norm, as mamba-ssm's blocks do."""
        return h.to(self.seq_norm.weight.dtype)

    def forward(self, h: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        inner, conv_state = self._split(state) if state is not None else (None, None)
        if self.conv is not None:
            c, conv_state = self.conv(self._branch_input(h), conv_state)
            h = h + c
        y, inner = self.seq_modeling_block(self.seq_norm(self._branch_input(h)), inner)
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.ffn_norm(self._branch_input(h)))
        return h, self._join(inner, conv_state)

    def step(self, h: Tensor, state: State, *, decoder=None) -> tuple[Tensor, State]:
        """One token; ``decoder``: the layer's (``SequenceLayer.decoder``) to step it with."""
        inner, conv_state = self._split(state)
        if self.conv is not None:
            c, conv_state = self.conv.step(self._branch_input(h), conv_state)
            h = h + c
        layer_step = decoder.step if decoder is not None else self.seq_modeling_block.step
        y, inner = layer_step(self.seq_norm(self._branch_input(h)), inner)
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.ffn_norm(self._branch_input(h)))
        return h, self._join(inner, conv_state)


@dataclass
class ModelConfig:
    layer: str
    backbone: str = "transformer"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    mlp: bool = True
    intermediate_size: int | None = None
    norm_eps: float = 1e-6
    conv_kernel: int = 4
    tie_embeddings: bool = True
    residual_in_fp32: bool = False
    layer_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_intermediate_size(d_model: int) -> int:
    """SwiGLU width of about 8/3·d_model, rounded up to a multiple of 16."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


class LanguageModel(nn.Module):
    """embedding -> blocks -> RMSNorm -> tied head. ``lm(ids, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.backbone not in BACKBONES:
            raise ValueError(f"expected backbone in {BACKBONES}, got {config.backbone!r}")
        d = config.d_model
        hidden = config.intermediate_size or default_intermediate_size(d)
        layer_config = dict(config.layer_config)
        if config.backbone == "mamba":
            fields = layer_spec(config.layer).field_names()
            for option in ("share_qk", "use_gate"):
                if option in fields:
                    layer_config.setdefault(option, True)
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(create_layer(config.layer, d, **layer_config), d, backbone=config.backbone, mlp=config.mlp,
                  intermediate_size=hidden, norm_eps=config.norm_eps, conv_kernel=config.conv_kernel)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def head_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """The model's state: every block's state under the prefix ``"{i}."``."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return {f"{i}.{k}": v for i, block in enumerate(self.layers)
                for k, v in block.init_state(batch_size, device=device, dtype=dtype).items()}

    def block_states(self, state: State | None) -> list[State | None]:
        """The model's state split into each block's (``"{i}.{key}"`` -> block i's ``key``); Nones for None."""
        if state is None:
            return [None] * len(self.layers)
        out: list[dict] = [{} for _ in self.layers]
        for key, v in state.items():
            i, _, rest = key.partition(".")
            if not i.isdigit() or int(i) >= len(self.layers):
                raise ValueError(f"state key {key!r} does not belong to a model with {len(self.layers)} blocks")
            out[int(i)][rest] = v
        return out

    def _check_ids(self, input_ids: Tensor, ndim: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"expected input_ids to be an integer Tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        want = "(B, T)" if ndim == 2 else "(B,)"
        if input_ids.ndim != ndim:
            raise ValueError(f"expected input_ids of shape {want}, got {tuple(input_ids.shape)}")

    def forward(self, input_ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        self._check_ids(input_ids, 2)
        h = self._embed(input_ids)
        new_state: State = {}
        for i, (block, s) in enumerate(zip(self.layers, self.block_states(state))):
            h, s = block(h, s)
            new_state.update({f"{i}.{k}": v for k, v in s.items()})
        return self._head(h), new_state

    def _embed(self, ids: Tensor) -> Tensor:
        """The residual stream's start: the embeddings, in at least float32 with ``residual_in_fp32``."""
        h = self.embed_tokens(ids)
        return h.to(torch.promote_types(h.dtype, torch.float32)) if self.config.residual_in_fp32 else h

    def _head(self, h: Tensor) -> Tensor:
        return F.linear(self.norm(h.to(self.norm.weight.dtype)), self.head_weight)

    def step(self, token_ids: Tensor, state: State, *, decoders=None) -> tuple[Tensor, State]:
        """One token per batch element: token_ids (B,) -> logits (B, vocab), new state. ``decoders``
        (from ``decoders(batch_size)``): step the layers through them, as generation does."""
        self._check_ids(token_ids, 1)
        h = self._embed(token_ids)
        new_state: State = {}
        decoders = decoders or [None] * len(self.layers)
        for i, (block, s, dec) in enumerate(zip(self.layers, self.block_states(state), decoders)):
            h, s = block.step(h, s, decoder=dec)
            new_state.update({f"{i}.{k}": v for k, v in s.items()})
        return self._head(h), new_state

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` after the prompt: forward on the prompt, then ``step`` per token.

        ``temperature=0`` is greedy decoding. Returns the prompt followed by the new tokens.
        """
        self._check_ids(input_ids, 2)
        if input_ids.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token")
        logits, state = self(input_ids)
        last = logits[:, -1]
        out = [input_ids]
        decoders = self.decoders(input_ids.shape[0])
        for _ in range(max_new_tokens):
            token = _sample(last, temperature, top_k, generator)
            out.append(token[:, None])
            last, state = self.step(token, state, decoders=decoders)
        return torch.cat(out, dim=1)

    def decoders(self, batch_size: int) -> list:
        """Each block's layer decoder (``SequenceLayer.decoder``), for ``step(..., decoders=...)``."""
        return [block.seq_modeling_block.decoder(batch_size) for block in self.layers]

    def num_parameters(self, *, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed_tokens.weight.numel()


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def create_model(layer: str, backbone: str = "transformer", *, vocab_size: int = 256, d_model: int = 64,
                 n_layers: int = 2, mlp: bool = True, intermediate_size: int | None = None,
                 norm_eps: float = 1e-6, conv_kernel: int = 4, tie_embeddings: bool = True,
                 residual_in_fp32: bool = False, **layer_config) -> LanguageModel:
    """A ``LanguageModel`` of ``n_layers`` blocks of ``backbone`` around the registered ``layer``.

    ``residual_in_fp32``: keep the residual stream between blocks in (at least) float32 while the blocks
    run in the model's dtype, as mamba-ssm's ``MambaLMHeadModel`` does by default; a float32 or float64
    model computes the same numbers either way."""
    return LanguageModel(ModelConfig(layer=layer, backbone=backbone, vocab_size=vocab_size, d_model=d_model,
                                     n_layers=n_layers, mlp=mlp, intermediate_size=intermediate_size,
                                     norm_eps=norm_eps, conv_kernel=conv_kernel, tie_embeddings=tie_embeddings,
                                     residual_in_fp32=residual_in_fp32, layer_config=layer_config))
