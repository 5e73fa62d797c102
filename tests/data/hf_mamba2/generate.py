"""Writes the golden vectors in this folder from Hugging Face transformers' Mamba-2 (not run by the tests).

Needs ``transformers`` 4.x (4.57.6 here; the dev extra's) on a machine without CUDA, so that
``Mamba2Mixer.forward`` takes its pure-torch path (``torch_forward``, the chunked SSD in float32). Run:
``python tests/data/hf_mamba2/generate.py``.

- ``mixer_*``: a ``Mamba2Mixer`` built with transformers' own initialisation, parameters then moved away
  from it (A_log, dt_bias, D, the norm's weight, the conv), run on a float32 input.
- ``model_*``: a ``Mamba2ForCausalLM`` (its ``_init_weights``, then the same moves), logits of a batch of
  token ids; its config as JSON in the metadata, for ``seqzoo.interop.from_mamba_ssm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

HERE = Path(__file__).parent


def save(name: str, tensors: dict, meta: dict) -> None:
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    meta = {"source": f"transformers {transformers.__version__} Mamba2 (torch_forward)", **meta}
    save_file(tensors, str(HERE / f"{name}.safetensors"), metadata={"config": json.dumps(meta)})
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


def perturb(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log") or name.endswith("dt_bias") or name.endswith(".D") or name == "D":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("conv1d.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def mixer_cases() -> None:
    cases = [
        ("mixer_d64_N16_P16_T37", dict(hidden_size=64, state_size=16, head_dim=16, num_heads=8, chunk_size=16), 37),
        ("mixer_bias_dtlimit_d32_N8_P8_T50", dict(hidden_size=32, state_size=8, head_dim=8, num_heads=8, chunk_size=8,
                                                  use_bias=True, time_step_limit=(0.0, 0.05)), 50),
    ]
    for i, (name, options, T) in enumerate(cases):
        config = Mamba2Config(expand=2, n_groups=1, conv_kernel=4, layer_norm_epsilon=1e-5, **options)
        torch.manual_seed(10 + i)
        mixer = Mamba2Mixer(config, layer_idx=0).eval()
        perturb(mixer, torch.Generator().manual_seed(20 + i))
        x = torch.randn(2, T, options["hidden_size"], generator=torch.Generator().manual_seed(30 + i))
        with torch.no_grad():
            y = mixer(x)
        tensors = {"input": x, "output": y, **{f"param.{k}": v for k, v in mixer.state_dict().items()}}
        save(name, tensors, {"hf_config": config.to_dict(), "computed_in": "float32"})


def model_cases() -> None:
    config = Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16,
                          num_heads=4, expand=2, n_groups=1, chunk_size=8, conv_kernel=4, tie_word_embeddings=True,
                          layer_norm_epsilon=1e-5, residual_in_fp32=True)
    torch.manual_seed(40)
    model = Mamba2ForCausalLM(config).eval()
    perturb(model, torch.Generator().manual_seed(41))
    ids = torch.randint(0, 50, (2, 29), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        logits = model(ids).logits
    tensors = {"input_ids": ids, "logits": logits, **{f"param.{k}": v for k, v in model.state_dict().items()}}
    save("model_d32_L2_T29", tensors, {"hf_config": config.to_dict(), "computed_in": "float32"})


if __name__ == "__main__":
    mixer_cases()
    model_cases()
