"""Writes the golden vectors in this folder from flash-linear-attention 0.5.2 (not run by the tests).

Needs an environment with ``flash-linear-attention==0.5.2`` and ``fla-core==0.5.2`` (and a Triton that
fla imports with, 3.5 here; nothing of it runs). Run: ``python tests/data/fla_decay/generate.py DIR`` with
DIR the installed package's parent (site-packages).

- ``op_*``: fla's pure-torch references, loaded by path from the installed files:
  ``fla/ops/simple_gla/naive.py::naive_recurrent_simple_gla`` and ``::naive_chunk_simple_gla``,
  ``fla/ops/retention/naive.py::naive_retention`` (layout (B, H, T, ·), stored here as (B, T, H, ·); no
  state) and ``fla/ops/gla/naive.py::naive_recurrent_gla``. All compute in float32 whatever their input;
  the inputs are float32.
- ``layer_*``: fla's layers (written by ``layer_cases``; see there).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save(name: str, tensors: dict, config: dict) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(HERE / f"{name}.safetensors"), metadata={"config": json.dumps(config)})
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


def op_cases(site: Path) -> None:
    sgla = load(site / "fla/ops/simple_gla/naive.py")
    ret = load(site / "fla/ops/retention/naive.py")
    gla = load(site / "fla/ops/gla/naive.py")
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, K, V, init in [(2, 37, 3, 16, 8, False), (1, 65, 2, 32, 32, True), (2, 3, 1, 8, 4, True)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        decay = F.logsigmoid(rand(B, T, H) + 2.0)
        S0 = rand(B, H, K, V) if init else None
        o, S = sgla.naive_recurrent_simple_gla(q, k, v, decay, initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "g": decay, "o": o, "final_state": S}
        if init:
            tensors["initial_state"] = S0
        tag = f"B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}"
        save(f"op_simple_gla_{tag}", tensors, {
            "source": "fla 0.5.2 fla/ops/simple_gla/naive.py::naive_recurrent_simple_gla",
            "scale": K ** -0.5, "computed_in": "float32"})
    # fla's own chunked reference (whole chunks; its initial state is added in place, so it gets a copy)
    B, T, H, K, V, C = 1, 64, 2, 16, 8, 16
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    decay, S0 = F.logsigmoid(rand(B, T, H) + 2.0), rand(B, H, K, V)
    o, S = sgla.naive_chunk_simple_gla(q, k, v, decay, initial_state=S0.clone(), output_final_state=True, chunk_size=C)
    save(f"op_simple_gla_chunk_B{B}_T{T}_H{H}_K{K}_V{V}_init", {"q": q, "k": k, "v": v, "g": decay, "o": o,
                                                               "final_state": S, "initial_state": S0},
         {"source": "fla 0.5.2 fla/ops/simple_gla/naive.py::naive_chunk_simple_gla", "chunk_size": C,
          "scale": K ** -0.5, "computed_in": "float32"})
    # RetNet's fixed decays γ_h = 1 − 2^(−5−h), the parallel form (no state)
    for B, T, H, K, V in [(2, 33, 4, 16, 8), (1, 70, 3, 8, 16)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        hm = lambda t: t.transpose(1, 2).contiguous()
        o = ret.naive_retention(hm(q), hm(k), hm(v))
        save(f"op_retention_B{B}_T{T}_H{H}_K{K}_V{V}", {"q": q, "k": k, "v": v, "o": o.transpose(1, 2)},
             {"source": "fla 0.5.2 fla/ops/retention/naive.py::naive_retention", "scale": K ** -0.5,
              "decay": "gamma_h = 1 - 2^(-5-h)", "computed_in": "float32"})
    for B, T, H, K, V, init in [(2, 37, 3, 16, 8, False), (1, 65, 2, 32, 32, True), (2, 19, 2, 8, 12, True)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        gk = F.logsigmoid(rand(B, T, H, K)) / 16 if K != 8 else F.logsigmoid(rand(B, T, H, K) - 2.0)
        S0 = rand(B, H, K, V) if init else None
        o, S = gla.naive_recurrent_gla(q, k, v, gk, initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "gk": gk, "o": o, "final_state": S}
        if init:
            tensors["initial_state"] = S0
        save(f"op_gla_B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}", tensors, {
            "source": "fla 0.5.2 fla/ops/gla/naive.py::naive_recurrent_gla", "scale": K ** -0.5,
            "computed_in": "float32"})


if __name__ == "__main__":
    site = Path(sys.argv[1])
    op_cases(site)
    if "--ops-only" not in sys.argv:
        from layers_golden import layer_cases  # noqa: F401  (written with the layers)
