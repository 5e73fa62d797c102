"""The official TTT code's checkpoints (ttt-lm-pytorch's ``TTTForCausalLM``) as seqzoo models;
``seqzoo.interop.from_ttt_lm_pytorch`` reaches this converter through the registry."""

from __future__ import annotations

__all__ = ["from_ttt_lm_pytorch"]


_TTT_DEFAULTS = {  # ttt-lm-pytorch's TTTConfig defaults
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
    "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6, "pretraining_tp": 1,
    "tie_word_embeddings": True, "rope_theta": 10000.0, "use_gate": False, "share_qk": False,
    "ttt_layer_type": "linear", "ttt_base_lr": 1.0, "mini_batch_size": 16, "pre_conv": False,
    "conv_kernel": 4, "scan_checkpoint_group_size": 0,
}


def from_ttt_lm_pytorch(state_dict, config):
    """Build a ``LanguageModel`` equal to the official ``TTTForCausalLM`` with this state_dict.

    ``config``: a ``TTTConfig`` or a dict with its names (``hidden_size``, ``num_attention_heads``,
    ``ttt_layer_type``, ``pre_conv``, ...); missing keys take the official defaults. ``pre_conv`` selects
    the Mamba backbone. The model takes the state_dict's floating dtype and loads it strictly.
    """
    import torch

    from seqzoo.backbones import create_model

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif not isinstance(config, dict):
        config = dict(vars(config))
    cfg = {**_TTT_DEFAULTS, **{k: v for k, v in config.items() if k in _TTT_DEFAULTS}}
    kind = cfg["ttt_layer_type"]
    if kind not in ("linear", "mlp"):
        raise ValueError(f"expected ttt_layer_type 'linear' or 'mlp', got {kind!r}")
    if cfg["hidden_act"] != "silu" or cfg["pretraining_tp"] != 1:
        raise ValueError(
            f"expected hidden_act='silu' and pretraining_tp=1 (the SwiGLU MLP), got {cfg['hidden_act']!r}, "
            f"{cfg['pretraining_tp']!r}"
        )
    tie = bool(cfg["tie_word_embeddings"])
    model = create_model(
        f"ttt_{kind}",
        "mamba" if cfg["pre_conv"] else "transformer",
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        mlp=True, intermediate_size=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"],
        conv_kernel=cfg["conv_kernel"], tie_embeddings=tie,
        num_heads=cfg["num_attention_heads"], mini_batch_size=cfg["mini_batch_size"],
        ttt_base_lr=cfg["ttt_base_lr"], share_qk=bool(cfg["share_qk"]), use_gate=bool(cfg["use_gate"]),
        rope_theta=float(cfg["rope_theta"]), scan_checkpoint_group_size=cfg["scan_checkpoint_group_size"],
    )
    ours = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if tie:
                embed = state_dict.get("model.embed_tokens.weight")
                if embed is not None and not torch.equal(tensor, embed):
                    raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")
                continue
            ours[name] = tensor
        elif name.startswith("model."):
            ours[name[len("model."):]] = tensor
        else:
            raise ValueError(f"unexpected key {name!r} in a ttt-lm-pytorch TTTForCausalLM state_dict")
    dtype = next((t.dtype for t in ours.values() if t.is_floating_point()), None)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict(ours, strict=True)
    return model
