"""Values a decode step derives from parameters once (``seqzoo.nn.derived``) follow every change of them."""

import pytest
import torch

import seqzoo
from seqzoo.nn import derived

LAYERS = [("mamba", {}), ("ttt_linear", {"num_heads": 2}), ("ttt_mlp", {"num_heads": 2})]


def _fresh_step(name, config, layer, x, state):
    """The step of a twin of ``layer`` (same weights) that has never cached anything."""
    twin = seqzoo.create_layer(name, layer.d_model, **config).eval()
    twin.load_state_dict(layer.state_dict())
    return twin.step(x, state)[0]


@pytest.mark.parametrize("name,config", LAYERS)
def test_step_follows_in_place_parameter_changes(name, config):
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 16, **config).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        state = layer.forward(torch.randn(2, 5, 16))[1]
        before = layer.step(x, state)[0]
        for p in layer.parameters():  # every parameter, in place: cached derivations must notice
            p.mul_(1.25).add_(0.01)
        after = layer.step(x, state)[0]
        want = _fresh_step(name, config, layer, x, state)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


@pytest.mark.parametrize("name,config", LAYERS)
def test_layer_built_under_inference_mode_steps(name, config):
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = seqzoo.create_layer(name, 16, **config).eval()
        x = torch.randn(1, 16)
        state = layer.forward(torch.randn(1, 3, 16))[1]
        y1 = layer.step(x, state)[0]
        y2 = layer.step(x, state)[0]
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_step_after_inference_mode_still_trains():
    """A value cached under inference_mode is not reused where autograd records."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer("mamba", 16)
    x = torch.randn(1, 16)
    with torch.inference_mode():
        layer.step(x, layer.init_state(1))
    layer.A_log.requires_grad_(False)  # not tracked: the cached A may serve, but not an inference tensor
    y, _ = layer.step(x, layer.init_state(1))
    y.sum().backward()
    assert layer.in_proj.weight.grad is not None


def test_derived_rebuilds_on_replacement_and_version():
    owner = torch.nn.Linear(2, 2)
    calls = []

    def build():
        calls.append(1)
        return owner.weight.detach() * 2

    with torch.no_grad():
        a = derived(owner, "w2", [owner.weight], build)
        assert derived(owner, "w2", [owner.weight], build) is a and len(calls) == 1
        owner.weight.add_(1.0)  # in place
        b = derived(owner, "w2", [owner.weight], build)
        assert len(calls) == 2 and torch.equal(b, owner.weight * 2)
        owner.weight = torch.nn.Parameter(torch.zeros(2, 2))  # replaced
        c = derived(owner, "w2", [owner.weight], build)
        assert len(calls) == 3 and torch.equal(c, torch.zeros(2, 2))
    # while autograd records, nothing is cached
    derived(owner, "w2", [owner.weight], build)
    assert len(calls) == 4
