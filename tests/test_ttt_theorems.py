"""The equivalences of the TTT paper, as numbers: Theorem 1 (TTT-Linear with batch GD from W0 = 0 is
linear attention) and Theorem 2 (the Nadaraya-Watson learner is self-attention)."""

from __future__ import annotations

import pytest
import torch

import seqzoo
from seqzoo.testing import assert_close, scan_steps

THEOREM1 = dict(inner_norm=False, learnable_w0=False, learnable_lr=False, token_idx=False, rope=False,
                post_norm=False)


def same_weights(src, dst):
    """Copy src's parameters that dst has (q/k/v/o and, with share_qk, the convs and gate) into dst."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own}, strict=True)


@pytest.mark.parametrize("extra", [{}, {"share_qk": True, "use_gate": True}], ids=["plain", "shareqk-gate"])
def test_theorem1_ttt_linear_is_linear_attention(extra):
    """f(x) = xW, W0 = 0, η = ttt_base_lr/d = 1, one GD step over the whole sequence: z_t = Σ_{s≤t} (q_t·k_s) v_s."""
    torch.manual_seed(0)
    C, H, T = 32, 2, 45
    d = C // H
    ttt = seqzoo.create_layer("ttt_linear", C, num_heads=H, mini_batch_size=64, ttt_base_lr=float(d),
                              **THEOREM1, **extra).double()
    lin = seqzoo.create_layer("linear_attention", C, num_heads=H, feature_map="identity", normalize=False,
                              **extra).double()
    same_weights(ttt, lin)
    assert not any(n.startswith("W1") for n, _ in ttt.named_parameters())  # W0 = 0 is fixed
    assert torch.count_nonzero(ttt.W1) == 0
    x = torch.randn(2, T, C, dtype=torch.float64)
    with torch.no_grad():
        y_ttt, _ = ttt(x)
        y_lin, _ = lin(x)
        y_steps, _ = scan_steps(ttt, x)
    assert_close(y_ttt, y_lin, 1e-10, "Theorem 1: ttt_linear (batch GD) vs linear_attention")
    assert_close(y_steps, y_lin, 1e-10, "Theorem 1: ttt_linear decode vs linear_attention")
    # with mini-batches shorter than the sequence the weights move between them: no longer linear attention
    short = seqzoo.create_layer("ttt_linear", C, num_heads=H, mini_batch_size=8, ttt_base_lr=float(d),
                                **THEOREM1, **extra).double()
    short.load_state_dict(ttt.state_dict(), strict=False)
    with torch.no_grad():
        y_short, _ = short(x)
    assert_close(y_short[:, :8], y_lin[:, :8], 1e-10, "the first mini-batch is still linear attention")
    assert (y_short[:, 8:] - y_lin[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [{}, {"rope": False}, {"num_heads": 2, "share_qk": True, "use_gate": True}],
                         ids=["defaults", "no-rope", "shareqk-gate"])
def test_theorem2_nadaraya_watson_is_self_attention(extra):
    torch.manual_seed(0)
    nw = seqzoo.create_layer("ttt_nw", 64, **extra).double()
    att = seqzoo.create_layer("self_attention", 64, **extra).double()
    att.load_state_dict(nw.state_dict(), strict=True)  # the same parameter names
    x = torch.randn(2, 29, 64, dtype=torch.float64)
    with torch.no_grad():
        y_nw, st_nw = nw(x)
        y_att, st_att = att(x)
        y_steps, _ = scan_steps(nw, x)  # train (store k, v) then predict (kernel regression), token by token
        y2_nw, _ = nw(x[:, :7], st_nw)
        y2_att, _ = att(x[:, :7], st_att)
    assert_close(y_nw, y_att, 1e-12, "Theorem 2: ttt_nw vs self_attention")
    assert_close(y_steps, y_att, 1e-12, "Theorem 2: ttt_nw train/predict steps vs self_attention")
    assert_close(y2_nw, y2_att, 1e-12, "Theorem 2: continued from a state")
    assert sorted(st_nw) == sorted(st_att)
    for k in st_att:
        assert_close(st_nw[k], st_att[k], 1e-12, f"Theorem 2: state[{k!r}]")


def test_defaults_agree_with_self_attention():
    nw, att = seqzoo.layer_spec("ttt_nw"), seqzoo.layer_spec("self_attention")
    nw_defaults = {f.name: f.default for f in nw.fields}
    for f in att.fields:
        assert nw_defaults.get(f.name) == f.default, f"option {f.name}: ttt_nw {nw_defaults.get(f.name)} vs {f.default}"
