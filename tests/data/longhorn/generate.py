"""Writes the golden vectors in this folder from the official Longhorn code (not run by the tests).

Source: github.com/Cranial-XIX/longhorn, ``models/longhorn.py`` (commit 4ea1745). Its layer imports
mamba-ssm's CUDA kernels at module level; they are replaced here by empty stand-ins before the file is
loaded by path, and the layer is run through its own pure-torch ``Longhorn.step``, token by token
(the path its generation uses; the CUDA prefill kernel is not run). Computed in float64.

Run: ``python tests/data/longhorn/generate.py PATH/TO/models/longhorn.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent


def load_official(path: Path):
    stubs = {
        "mamba_ssm": {}, "mamba_ssm.ops": {},
        "mamba_ssm.ops.selective_scan_interface": {"longhorn_inner_fn": None, "selective_scan_online7_fn": None},
        "mamba_ssm.utils": {}, "mamba_ssm.utils.generation": {"GenerationMixin": object},
        "mamba_ssm.utils.hf": {"load_config_hf": None, "load_state_dict_hf": None},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("longhorn_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path: Path) -> None:
    official = load_official(path)
    cases = [("layer_d32_N8_T29", dict(d_model=32, d_state=8, d_conv=4, expand=2)),
             ("layer_d24_N4_k3_T17_rank5", dict(d_model=24, d_state=4, d_conv=3, expand=1, dt_rank=5))]
    for i, (name, config) in enumerate(cases):
        torch.manual_seed(10 + i)
        layer = official.Longhorn(**config).double()
        gen = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():  # away from the initial values, so that every term is exercised
            layer.D.copy_(torch.randn(layer.D.shape, generator=gen, dtype=torch.float64))
            layer.dt_head.bias.copy_(torch.randn(layer.dt_head.bias.shape, generator=gen, dtype=torch.float64))
            layer.conv1d.bias.copy_(0.3 * torch.randn(layer.conv1d.bias.shape, generator=gen, dtype=torch.float64))
        T = int(name.split("_T")[1].split("_")[0])
        x = torch.randn(2, T, config["d_model"], generator=gen, dtype=torch.float64)
        conv_state = torch.zeros(2, layer.d_inner, layer.d_conv, dtype=torch.float64)
        ssm_state = torch.zeros(2, layer.d_inner, layer.d_state, dtype=torch.float64)
        ys = []
        with torch.no_grad():
            for t in range(T):
                y, conv_state, ssm_state = layer.step(x[:, t:t + 1], conv_state, ssm_state)
                ys.append(y)
        tensors = {"input": x, "output": torch.cat(ys, dim=1), "ssm_state": ssm_state}
        tensors.update({f"param.{k}": v for k, v in layer.state_dict().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / f"{name}.safetensors"),
                  metadata={"config": json.dumps({"source": "Cranial-XIX/longhorn models/longhorn.py @4ea1745, "
                                                            "Longhorn.step token by token",
                                                  "layer_config": config, "computed_in": "float64"})})
        print(name, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
