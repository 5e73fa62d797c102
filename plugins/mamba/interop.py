"""mamba-ssm's ``MambaLMHeadModel`` and Hugging Face's ``MambaForCausalLM`` checkpoints as seqzoo models;
``seqzoo.interop.from_mamba_ssm`` reaches this converter through the registry."""

from __future__ import annotations

__all__ = ["from_mamba_ssm"]


_MAMBA_ALIASES = {  # our name: (mamba-ssm name, Hugging Face name, ...)
    "d_model": ("d_model", "hidden_size"),
    "n_layers": ("n_layer", "num_hidden_layers"),
    "vocab_size": ("vocab_size",),
    "d_state": ("d_state", "state_size"),
    "d_conv": ("d_conv", "conv_kernel"),
    "expand": ("expand",),
    "dt_rank": ("dt_rank", "time_step_rank"),
    "bias": ("bias", "use_bias"),
    "conv_bias": ("conv_bias", "use_conv_bias"),
    "norm_eps": ("norm_epsilon", "layer_norm_epsilon"),
    "tie_embeddings": ("tie_embeddings", "tie_word_embeddings"),
}


def _mamba_config_dict(config) -> dict:
    """A mamba-ssm ``MambaConfig``, an HF ``MambaConfig`` or a plain dict, as one flat dict."""
    import dataclasses

    if isinstance(config, dict):
        out = dict(config)
    elif hasattr(config, "to_dict"):
        out = config.to_dict()
    elif dataclasses.is_dataclass(config):
        out = dataclasses.asdict(config)
    else:
        raise TypeError(f"expected config as a dict, a mamba-ssm or a transformers MambaConfig, got {type(config).__name__}")
    ssm_cfg = out.pop("ssm_cfg", None) or {}  # mamba-ssm keeps the mixer's options here
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"only Mamba (v1) mixers convert, got ssm_cfg layer {ssm_cfg['layer']!r}")
    return {**out, **{k: v for k, v in ssm_cfg.items() if k != "layer"}}


def from_mamba_ssm(state_dict, config):
    """Build a ``LanguageModel`` equal to mamba-ssm's ``MambaLMHeadModel`` / HF ``MambaForCausalLM``.

    Accepts either project's state_dict layout (``backbone.embedding`` or ``backbone.embeddings``) and
    config names (``d_model``/``hidden_size``, ``n_layer``/``num_hidden_layers``, ...). The model is a
    transformer backbone without MLP around the ``mamba`` layer, in the state_dict's dtype, with the
    residual stream in float32 unless the config says ``residual_in_fp32=False`` (both projects' default
    is True; it changes nothing for float32 and float64 weights).
    """
    import torch

    from seqzoo.backbones import create_model

    cfg = _mamba_config_dict(config)
    opts = {}
    for ours, names in _MAMBA_ALIASES.items():
        for n in names:
            if cfg.get(n) is not None:
                opts[ours] = cfg[n]
                break
    for key, want in (("rms_norm", True), ("hidden_act", "silu"), ("d_intermediate", 0)):
        if key in cfg and cfg[key] != want:
            raise ValueError(f"from_mamba_ssm supports {key}={want!r} only, got {cfg[key]!r}")
    if cfg.get("attn_layer_idx"):
        raise ValueError(f"from_mamba_ssm supports pure Mamba stacks, got attn_layer_idx={cfg['attn_layer_idx']}")
    for key in ("d_model", "n_layers"):
        if key not in opts:
            raise ValueError(f"config lacks {' / '.join(_MAMBA_ALIASES[key])}")
    d_inner = opts.get("expand", 2) * opts["d_model"]
    if cfg.get("intermediate_size") not in (None, d_inner):
        raise ValueError(f"expected intermediate_size = expand · hidden_size = {d_inner}, "
                         f"got {cfg['intermediate_size']}")

    sd = dict(state_dict)
    embed_key = next((k for k in ("backbone.embedding.weight", "backbone.embeddings.weight") if k in sd), None)
    if embed_key is None:
        raise ValueError("expected 'backbone.embedding.weight' (mamba-ssm) or 'backbone.embeddings.weight' "
                         f"(Hugging Face) in the state_dict, got keys {sorted(sd)[:5]}...")
    embedding = sd.pop(embed_key)
    opts["vocab_size"] = embedding.shape[0]  # mamba-ssm pads the vocabulary; the weight says by how much
    tie = bool(opts.pop("tie_embeddings", True))
    head = sd.pop("lm_head.weight", None)
    if tie and head is not None and not torch.equal(head, embedding):
        raise ValueError("config says tied embeddings but lm_head.weight differs from the embedding")
    if not tie and head is None:
        raise ValueError("config says untied embeddings but the state_dict has no lm_head.weight")
    if opts.get("dt_rank") == "auto":
        opts.pop("dt_rank")

    ours = {"embed_tokens.weight": embedding}
    if not tie:
        ours["lm_head.weight"] = head
    for key, value in sd.items():
        if key == "backbone.norm_f.weight":
            ours["norm.weight"] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["backbone", "layers"] or len(parts) < 5 or parts[3] not in ("mixer", "norm"):
            raise ValueError(f"unexpected key {key!r} in a mamba-ssm / Hugging Face Mamba state_dict")
        where = "seq_modeling_block" if parts[3] == "mixer" else "seq_norm"
        ours[".".join(["layers", parts[2], where, *parts[4:]])] = value

    model = create_model("mamba", backbone="transformer", mlp=False, vocab_size=opts.pop("vocab_size"),
                         d_model=opts.pop("d_model"), n_layers=opts.pop("n_layers"),
                         norm_eps=opts.pop("norm_eps", 1e-5), tie_embeddings=tie,
                         residual_in_fp32=bool(cfg.get("residual_in_fp32", True)), **opts)
    model = model.to(embedding.dtype)
    model.load_state_dict(ours, strict=True)
    return model
