"""mamba-ssm's ``MambaLMHeadModel`` and Hugging Face's ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
checkpoints as seqzoo models; ``seqzoo.interop.from_mamba_ssm`` reaches this converter through the
registry. Mamba (v1) mixers become ``mamba`` layers, Mamba-2 mixers ``mamba2`` layers (registered by the
``decay`` plugin; reached by name)."""

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
_MAMBA2_ALIASES = {  # Mamba-2's mixer options, where they differ from Mamba's
    "headdim": ("headdim", "head_dim"),
    "ngroups": ("ngroups", "n_groups"),
    "dt_limit": ("dt_limit", "time_step_limit"),
    "rmsnorm": ("rmsnorm", "rms_norm"),
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
    layer = ssm_cfg.get("layer", "Mamba2" if out.get("model_type") == "mamba2" else "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"expected Mamba1 or Mamba2 mixers, got ssm_cfg layer {layer!r}")
    return {**out, **{k: v for k, v in ssm_cfg.items() if k != "layer"}, "layer": layer}


def from_mamba_ssm(state_dict, config):
    """Build a ``LanguageModel`` equal to mamba-ssm's ``MambaLMHeadModel`` / HF ``MambaForCausalLM`` /
    HF ``Mamba2ForCausalLM``.

    Accepts either project's state_dict layout (``backbone.embedding`` or ``backbone.embeddings``) and
    config names (``d_model``/``hidden_size``, ``n_layer``/``num_hidden_layers``, ...); a mamba-ssm config
    whose ``ssm_cfg`` says ``"layer": "Mamba2"`` or an HF config of ``model_type`` ``mamba2`` builds
    ``mamba2`` layers. The model is a transformer backbone without MLP around the layer, in the
    state_dict's dtype, with the residual stream in float32 unless the config says
    ``residual_in_fp32=False`` (both projects' default is True; it changes nothing for float32 and float64
    weights). Mamba-2: HF's gated norm spans the whole inner width whatever ``n_groups``, mamba-ssm's (and
    seqzoo's) each group's, so HF checkpoints with ``n_groups`` > 1 are refused.
    """
    import torch

    from seqzoo.backbones import create_model

    cfg = _mamba_config_dict(config)
    version = cfg.pop("layer")
    aliases = dict(_MAMBA_ALIASES)
    if version == "Mamba2":
        for key in ("dt_rank",):
            aliases.pop(key)
        aliases.update(_MAMBA2_ALIASES)
    opts = {}
    for ours, names in aliases.items():
        for n in names:
            if cfg.get(n) is not None:
                opts[ours] = cfg[n]
                break
    for key, want in ((("rms_norm", True),) if version == "Mamba1" else ()) + (("hidden_act", "silu"), ("d_intermediate", 0)):
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
    if version == "Mamba2":
        heads = d_inner // opts.get("headdim", 64)
        if cfg.get("num_heads") not in (None, heads):
            raise ValueError(f"expected num_heads = d_inner / head_dim = {heads}, got {cfg['num_heads']}")
        if cfg.get("model_type") == "mamba2" and opts.get("ngroups", 1) != 1:
            raise ValueError("Hugging Face's Mamba-2 normalises over the whole inner width whatever n_groups "
                             f"(mamba-ssm per group); only n_groups = 1 converts, got {opts['ngroups']}")
        if cfg.get("d_ssm") not in (None, d_inner):
            raise ValueError(f"expected d_ssm = d_inner (no MLP part in the mixer), got {cfg['d_ssm']}")
        if isinstance(opts.get("dt_limit"), list):
            opts["dt_limit"] = tuple(float(v) for v in opts["dt_limit"])
        if cfg.get("model_type") == "mamba2" and "norm_eps" in opts:
            opts["rmsnorm_eps"] = opts["norm_eps"]  # HF's mixer norm takes the model's eps (mamba-ssm: 1e-5)

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

    model = create_model("mamba" if version == "Mamba1" else "mamba2", backbone="transformer", mlp=False, vocab_size=opts.pop("vocab_size"),
                         d_model=opts.pop("d_model"), n_layers=opts.pop("n_layers"),
                         norm_eps=opts.pop("norm_eps", 1e-5), tie_embeddings=tie,
                         residual_in_fp32=bool(cfg.get("residual_in_fp32", True)), **opts)
    model = model.to(embedding.dtype)
    model.load_state_dict(ours, strict=True)
    return model
