"""The recipes of ``seqzoo compare``: one dict per preset (``quick``, ``default``, ``ladder``, ``paper``,
``delta``, ``decay``).

A preset names its tasks; each task entry says what to train and how to spend the budget:

- ``task_config``: the task's data options; ``d_models``: the model widths, a list, or a dict by backbone
  (``{"mamba": [16, 32, 64], "transformer": [64]}``); ``n_layers``, ``batch_size``, ``steps``,
  ``warmup_frac``, ``eval_batch_size``, optional ``layer_config`` (options passed to layers that have them);
- ``lrs``: the learning rates, tried in this order with the first seed; a run that reaches ``stop_at``
  ends the sweep (the later rates are skipped), otherwise the best rate by the task's headline metric wins;
- ``eval_every`` and ``stop_at``: early stopping on the held-out set (zoology's rule: a solved run stops);
- ``seeds``: runs at the winning rate (seeds differ in initialisation and data order, the held-out set is
  fixed); ``seeds_when``: ``"always"``, or ``"unsolved_at_largest"`` (only at a backbone's largest width,
  and only when the first seed did not reach ``stop_at``; elsewhere one seed).

``task_defaults``: the recipe of a task the preset does not name (``--tasks`` with a plugin's task).
``claims``: the known results the run checks (``KNOWN_CLAIMS``; evaluated by ``seqzoo.bench.claims``).
``reference_layer``: the layer whose transformer-backbone model sets every cell's parameter target.
``layers``: the layers compared unless ``--layers`` names others (``PAPER_LAYERS``, ``DELTA_LAYERS``,
``DECAY_LAYERS``).

A preset may instead of layers × backbones list ``variants``: named rows, each a layer, a backbone and
options (the ``ladder`` preset: the ablation rows of the TTT paper's Table 1).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "RECIPE", "preset", "widths", "LADDER_PAPER_PERPLEXITY", "KNOWN_CLAIMS", "PAPER_LAYERS",
           "DELTA_LAYERS", "DECAY_LAYERS"]

RECIPE = {
    "optimizer": "AdamW",
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "schedule": "linear warmup then cosine decay to 0.1·lr",
}


def _mqar_paper() -> dict:
    """The zoology / Based MQAR recipe (arXiv 2402.18668 figure 2; zoology's configs)."""
    vocab = 8192
    train_segments = [
        [64, 4, 100_000],
        [128, 8, 20_000],
        [256, 16, 20_000],
        [256, 32, 20_000],
        [256, 64, 20_000],
    ]
    test_segments = [
        [64, 4, 1000],
        [64, 8, 1000],
        [64, 16, 1000],
        [128, 32, 1000],
        [256, 64, 1000],
        [512, 128, 1000],
        [1024, 256, 1000],
    ]
    batch, epochs = 256, 32
    n_train = sum(s[2] for s in train_segments)
    return {
        "task_config": {"vocab_size": vocab, "train": train_segments, "test": test_segments},
        "d_models": [64, 128, 256, 512],
        "n_layers": 2,
        "batch_size": batch,
        "steps": epochs * n_train // batch,
        "warmup_frac": 0.1,
        "lrs": [float(f"{10**e:.3g}") for e in (-4.0, -10 / 3, -8 / 3, -2.0)],
        "eval_batch_size": 32,
        "eval_every": 2000,
        "stop_at": 0.99,
        "seeds": 1,
    }


# The byte-LM recipe shared by the default comparison and the ablation ladder.
_LM_CPU = {
    "task_config": {"seq_len": 512, "num_eval": 32},
    "d_models": [64],
    "n_layers": 2,
    "batch_size": 8,
    "steps": 600,
    "warmup_frac": 0.1,
    "lrs": [3e-3],
    "eval_batch_size": 16,
    "seeds": 2,
    "seeds_when": "always",
}

# The rows of the TTT paper's Table 1 (125M, Pile 2k), each one switch away from the row before: from
# linear attention to the Theorem 1 form of TTT-Linear (f(x) = xW, W0 = 0, batch GD with η = 1 — the
# same function class), then learnable W0, LayerNorm + residual in f, mini-batches of 16, a learnable η,
# and the Mamba backbone. RoPE, the token-index scale and the output LayerNorm stay off in every row so
# that each row changes one thing.
_THEOREM1 = {
    "inner_norm": False,
    "learnable_w0": False,
    "learnable_lr": False,
    "token_idx": False,
    "rope": False,
    "post_norm": False,
    "mini_batch_size": 512,
    "ttt_base_lr": 16.0,  # the head width (d_model 64, 4 heads): η = ttt_base_lr / d = 1
}


def _ladder_rows() -> list[dict]:
    rows = [
        {"name": "linear attention", "layer": "linear_attention", "backbone": "transformer",
         "layer_config": {"feature_map": "identity", "normalize": False}},
        {"name": "TTT-Linear = linear attention (Theorem 1)", "layer": "ttt_linear",
         "backbone": "transformer", "layer_config": dict(_THEOREM1)},
    ]
    steps = [
        ("+ learnable W0", {"learnable_w0": True}),
        ("+ LayerNorm and residual in f", {"inner_norm": True}),
        ("+ mini-batch TTT (b = 16)", {"mini_batch_size": 16}),
        ("+ learnable η", {"learnable_lr": True}),
    ]
    for name, change in steps:
        rows.append({**rows[-1], "name": name, "layer_config": {**rows[-1]["layer_config"], **change}})
    rows.append({**rows[-1], "name": "+ Mamba backbone", "backbone": "mamba"})
    return rows


#: The perplexities of the TTT paper's Table 1, row by row (125M parameters, the Pile, context 2k).
LADDER_PAPER_PERPLEXITY = [15.23, 15.23, 15.27, 14.05, 12.35, 11.99, 11.09]


#: The known claims a comparison of the built-in layers checks: data, evaluated by ``seqzoo.bench.claims``
#: (one function per ``kind``, which names no layer); a claim whose layers or task are not in the run is
#: "not tested".
KNOWN_CLAIMS = [
    {"kind": "solves", "layer": "self_attention", "task": "mqar",
     "text": "softmax attention solves MQAR (≥ the solve threshold in every backbone)"},
    {"kind": "grows_with_state", "task": "mqar",
     "text": "MQAR accuracy grows with state size for the fixed-state layers"},
    {"kind": "equal", "layers": ["ttt_nw", "self_attention"],
     "text": "ttt_nw equals self_attention (Theorem 2): the same results within noise"},
    {"kind": "uses_context", "layers": ["self_attention", "ttt_nw", "ttt_linear", "ttt_mlp"], "task": "lm",
     "text": "attention and TTT layers use context: LM loss at positions 16–31 above that over the window's "
             "second half by more than the seed spread"},
    {"kind": "plateaus", "layer": "rnn", "reference": "self_attention", "task": "lm",
     "text": "the naive RNN's loss plateaus where attention's still falls: from the window's third quarter to "
             "its second half the RNN gains less than self_attention in the same backbone, by more than the "
             "seed spread (relative to attention, so that the data's own change of difficulty with position "
             "cancels)"},
]

_LADDER_CLAIM = {"kind": "ladder", "task": "lm", "metric": "bits_per_byte",
                 "paper_perplexity": LADDER_PAPER_PERPLEXITY,
                 "text": "each step of the TTT paper's ablation ladder moves perplexity as in Table 1"}


#: The layers a preset compares unless ``--layers`` names others: the seven layers of the TTT paper's
#: comparison. Other registered layers (the delta-rule family, a plugin's) join through ``--layers`` or a
#: preset of their own (``delta``), so the default run keeps its time budget.
PAPER_LAYERS = ["rnn", "linear_attention", "self_attention", "mamba", "ttt_nw", "ttt_linear", "ttt_mlp"]

#: The ``delta`` preset's layers: the delta-rule family beside linear attention (its no-forgetting,
#: no-correction ancestor) and softmax attention (the recall reference). ``titans`` is left out: its
#: generic per-token path trains at about 1.7 s a step at the default MQAR size (30× linear attention).
DELTA_LAYERS = ["linear_attention", "self_attention", "deltanet", "gated_deltanet", "mesanet", "longhorn"]

#: The ``decay`` preset's layers: linear attention with a decay (fixed per head, data-dependent per key
#: feature, tied to the key; Mamba-2's scalar decay per head) beside linear attention (no decay), softmax
#: attention and softmax attention over a sliding window (a FIFO memory: 64 keys, the whole of an MQAR
#: sequence, an eighth of an LM window).
DECAY_LAYERS = ["linear_attention", "self_attention", "retnet", "gla", "hgrn2", "mamba2", "sliding_window_attention"]

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "description": "seconds-long smoke run (tests): tiny widths, a few steps; numbers are not meaningful",
        "tasks": {
            "mqar": {
                "task_config": {"vocab_size": 64, "train": [[32, 4, 256]], "test": [[32, 4, 64]]},
                "d_models": [32],
                "n_layers": 1,
                "batch_size": 16,
                "steps": 6,
                "warmup_frac": 0.2,
                "lrs": [3e-3],
                "eval_batch_size": 64,
                "seeds": 1,
            },
            "lm": {
                "task_config": {"seq_len": 32, "max_train_bytes": 100_000, "num_eval": 8},
                "d_models": [32],
                "n_layers": 1,
                "batch_size": 8,
                "steps": 4,
                "warmup_frac": 0.2,
                "lrs": [3e-3],
                "eval_batch_size": 8,
                "seeds": 1,
            },
        },
        "speed": {
            "d_model": 32,
            "n_layers": 1,
            "lengths": [16, 32],
            "decode_positions": [8],
            "repeats": 1,
            "warmup": 0,
            "decode_steps": 2,
        },
        "reference_layer": "self_attention",
        "claims": KNOWN_CLAIMS,
        "layers": PAPER_LAYERS,
    },
    "default": {
        "description": "CPU-sized recipe for 2 cores: recall at three widths in the Mamba backbone with a "
        "learning-rate sweep and early stopping, a byte LM on 512-byte windows, two seeds where it matters",
        "tasks": {
            "mqar": {
                # zoology's recipe scaled to a CPU: a curriculum of 4 pairs in 32 tokens and 6 pairs in 48
                # (the easy examples let attention in the transformer backbone form its induction circuit:
                # trained on 6-in-48 alone it reached 0.978 in the same steps, on 8 pairs in 64 tokens with
                # vocabulary 128 it stayed at 0.15 after 3000 steps), scored on 6 pairs in 48 tokens
                "task_config": {
                    "vocab_size": 64,
                    "train": [[32, 4, 10000], [48, 6, 10000]],
                    "test": [[48, 6, 1000]],
                    "random_non_queries": False,
                },
                "d_models": {"mamba": [16, 32, 64], "transformer": [64]},
                "n_layers": 2,
                "batch_size": 64,
                "steps": 2500,
                "warmup_frac": 0.1,
                "lrs": [3e-3, 1e-2],
                "eval_batch_size": 250,
                "eval_every": 250,
                "stop_at": 0.99,
                "seeds": 2,
                "seeds_when": "unsolved_at_largest",
            },
            "lm": copy.deepcopy(_LM_CPU),
        },
        "speed": {
            "d_model": 64,
            "n_layers": 2,
            "lengths": [256, 1024, 4096],
            "decode_positions": [64, 1024],
            "repeats": 2,
            "warmup": 1,
            "decode_steps": 4,
        },
        "reference_layer": "self_attention",
        "claims": KNOWN_CLAIMS,
        "layers": PAPER_LAYERS,
    },
    "ladder": {
        "description": "the ablation ladder of the TTT paper's Table 1 on the byte LM: linear attention to "
        "TTT-Linear in the Mamba backbone, one switch per row, one recipe, two seeds",
        "tasks": {"lm": copy.deepcopy(_LM_CPU)},
        "variants": _ladder_rows(),
        "speed": None,
        "reference_layer": "self_attention",
        "claims": [_LADDER_CLAIM],
    },
    "paper": {
        "description": "the zoology/Based MQAR sweep and the TTT paper's 125M LM (d 768, 12 layers, 12 heads); "
        "needs a GPU",
        "tasks": {
            "mqar": _mqar_paper(),
            "lm": {
                "task_config": {"seq_len": 2048, "num_eval": 256, "max_train_bytes": 10**12},
                "d_models": [768],
                "n_layers": 12,
                "layer_config": {"num_heads": 12},
                "batch_size": 256,
                "steps": 4800,
                "warmup_frac": 0.1,
                "lrs": [3e-3],
                "eval_batch_size": 8,
                "seeds": 1,
            },
        },
        "speed": {
            "d_model": 768,
            "n_layers": 12,
            "layer_config": {"num_heads": 12},
            "lengths": [1024, 4096, 16384],
            "decode_positions": [1024, 16384],
            "repeats": 5,
            "warmup": 2,
            "decode_steps": 16,
        },
        "reference_layer": "self_attention",
        "claims": KNOWN_CLAIMS,
        "layers": PAPER_LAYERS,
    },
}

# the delta-rule family on the default recipe (tasks, widths, seeds, speed), beside its references
PRESETS["delta"] = {
    **copy.deepcopy(PRESETS["default"]),
    "description": "the delta-rule family (DeltaNet, Gated DeltaNet, MesaNet, Longhorn) beside linear and "
    "softmax attention, on the default recipe",
    "layers": DELTA_LAYERS,
}


# decayed linear attention on the same recipe
PRESETS["decay"] = {
    **copy.deepcopy(PRESETS["default"]),
    "description": "decayed linear attention (RetNet, GLA, HGRN2, Mamba-2) and sliding-window attention beside "
    "linear and softmax attention, on the default recipe",
    "layers": DECAY_LAYERS,
}


# A task a preset does not name (a plugin's, with --tasks) trains with the preset's language-model recipe and
# the task's own data defaults.
for _p in PRESETS.values():
    _p.setdefault("task_defaults", {k: v for k, v in _p["tasks"]["lm"].items() if k != "task_config"})


def preset(name: str) -> dict[str, Any]:
    """A deep copy of a preset (``quick``, ``default``, ``ladder``, ``paper``, ``delta``, ``decay``)."""
    if name not in PRESETS:
        raise ValueError(f"expected --preset in {sorted(PRESETS)}, got {name!r}")
    return copy.deepcopy(PRESETS[name])


def widths(tcfg: dict, backbone: str) -> list[int]:
    """A task's model widths in ``backbone`` (``d_models`` is a list, or a dict by backbone)."""
    d = tcfg["d_models"]
    if isinstance(d, dict):
        if backbone not in d:
            raise ValueError(f"expected d_models for backbone {backbone!r}, got keys {sorted(d)}")
        d = d[backbone]
    if not d or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in d):
        raise ValueError(f"expected a non-empty list of positive widths, got {d!r}")
    return list(d)
