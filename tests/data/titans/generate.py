"""Writes the golden vectors in this folder from titans-pytorch 0.5.5 (not run by the tests).

``titans_pytorch.NeuralMemory`` in the configuration seqzoo's ``titans`` layer implements: every token a
chunk of its own and a weight update (``chunk_size=1, batch_size=1``), no input RMSNorm
(``pre_rmsnorm=False``), first-order momentum, the default memory (``MemoryMLP`` in its
``ResidualNorm``: f(x) = x + LN(MLP(x))·(γ + 1)), several heads (with their retrieve gate and
``combine_heads``). Parameters are moved away from their initial values (biases, γ) so that every term
is exercised; computed in float64 with ``NeuralMemory.forward`` on the whole sequence.

Run: ``python tests/data/titans/generate.py`` in an environment with ``titans-pytorch==0.5.5``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from titans_pytorch import NeuralMemory

HERE = Path(__file__).parent

CASES = [
    ("memory_mlp_d32_h2_T19", dict(dim=32, heads=2, dim_head=16, default_step_transform_max_lr=0.1)),
    ("memory_linear_d24_h3_T13", dict(dim=24, heads=3, dim_head=8, default_step_transform_max_lr=0.5,
                                      default_model_kwargs=dict(depth=1, expansion_factor=1.0))),
]

for i, (name, extra) in enumerate(CASES):
    torch.manual_seed(30 + i)
    config = dict(chunk_size=1, batch_size=1, pre_rmsnorm=False, momentum=True, **extra)
    memory = NeuralMemory(**config).double()
    gen = torch.Generator().manual_seed(40 + i)
    with torch.no_grad():
        for pname, p in memory.named_parameters():
            if pname.endswith("bias") or pname == "memory_model_parameters.0":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    T = int(name.rsplit("_T", 1)[1])
    x = torch.randn(2, T, config["dim"], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, _ = memory(x)
    tensors = {"input": x, "output": y}
    tensors.update({f"param.{k}": v for k, v in memory.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / f"{name}.safetensors"),
              metadata={"config": json.dumps({"source": "titans-pytorch 0.5.5 NeuralMemory.forward",
                                              "neural_memory": config, "computed_in": "float64"})})
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})
