"""What a decode step keeps between tokens (``seqzoo.nn.cached_views``) follows every change of the parameters."""

import pytest
import torch

import seqzoo
from seqzoo.nn import cached_views

LAYERS = [("mamba", {}), ("ttt_linear", {"num_heads": 2}), ("ttt_mlp", {"num_heads": 2})]


def _fresh_step(name, config, layer, x, state):
    """The step of a twin of ``layer`` (same weights) that has never cached anything."""
    twin = seqzoo.create_layer(name, layer.d_model, **config).eval()
    twin.load_state_dict(layer.state_dict())
    return twin.step(x, state)[0]


@pytest.mark.parametrize("name,config", LAYERS)
def test_layer_built_under_inference_mode_steps(name, config):
    """A layer built and stepped under inference_mode steps as a twin built outside it (whose step
    caches nothing under inference_mode), twice in a row: what the first step kept is right."""
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = seqzoo.create_layer(name, 16, **config).eval()
        x = torch.randn(1, 16)
        state = layer.forward(torch.randn(1, 3, 16))[1]
        y1 = layer.step(x, state)[0]
        y2 = layer.step(x, state)[0]
    state = {k: v.clone() for k, v in state.items()}  # plain tensors, outside inference_mode
    with torch.no_grad():
        want = _fresh_step(name, config, layer, x.clone(), state)
    torch.testing.assert_close(y1, want, rtol=0, atol=0)
    torch.testing.assert_close(y2, want, rtol=0, atol=0)


@pytest.mark.parametrize("name,config", LAYERS)
def test_step_after_inference_mode_still_trains(name, config):
    """Nothing kept from a step under inference_mode (an inference tensor) is reused where autograd
    records, also for parameters that do not require grad."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 16, **config)
    x = torch.randn(1, 16)
    with torch.inference_mode():
        layer.step(x, layer.init_state(1))
    frozen = [p for n, p in layer.named_parameters() if not n.endswith(("in_proj.weight", "q_proj.weight"))]
    for p in frozen:
        p.requires_grad_(False)
    y, _ = layer.step(x, layer.init_state(1))
    y.sum().backward()
    trained = layer.in_proj.weight if name == "mamba" else layer.q_proj.weight
    assert trained.grad is not None


@pytest.mark.parametrize("name,config", LAYERS)
@pytest.mark.parametrize("how", ["in_place", "data", "vector_to_parameters"])
def test_step_follows_every_parameter_change(name, config, how):
    """In place, through ``.data`` or into a vector the parameters alias (the last two bump no version
    counter): the step equals a fresh twin's with the new weights, bit for bit."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 16, **config).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        state = layer.forward(torch.randn(2, 5, 16))[1]
        before = layer.step(x, state)[0]
        if how in ("in_place", "data"):
            for p in layer.parameters():
                (p if how == "in_place" else p.data).mul_(1.25).add_(0.01)
        else:
            vec = torch.nn.utils.parameters_to_vector(layer.parameters())
            torch.nn.utils.vector_to_parameters(vec, layer.parameters())
            vec.mul_(1.25).add_(0.01)
        after = layer.step(x, state)[0]
        want = _fresh_step(name, config, layer, x, state)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_cached_views_keeps_views_only():
    owner = torch.nn.Linear(3, 2)
    calls = []

    def build(fn):
        calls.append(1)
        return fn()

    with torch.no_grad():
        a = cached_views(owner, "t", [owner.weight], lambda: build(owner.weight.t))
        assert cached_views(owner, "t", [owner.weight], lambda: build(owner.weight.t)) is a and len(calls) == 1
        owner.weight.data.add_(1.0)  # a view sees it without being rebuilt
        assert torch.equal(a, owner.weight.t())
        owner.weight = torch.nn.Parameter(torch.zeros(2, 3))  # replaced: rebuilt
        b = cached_views(owner, "t", [owner.weight], lambda: build(owner.weight.t))
        assert len(calls) == 2 and torch.equal(b, torch.zeros(3, 2))
        # a computed value is never kept
        for _ in range(2):
            cached_views(owner, "twice", [owner.weight], lambda: build(lambda: owner.weight * 2))
        assert len(calls) == 4
    # while autograd records, nothing is kept
    cached_views(owner, "t", [owner.weight], lambda: build(owner.weight.t))
    assert len(calls) == 5


def test_vmap_over_functional_call():
    """An ensemble of TTT layers run with torch.func (BatchedTensor parameters have no data pointer)."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer("ttt_linear", 16, num_heads=2).eval()
    params = {k: torch.stack([v, v * 1.1]) for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        state = layer.init_state(1)
        run = lambda p: torch.func.functional_call(layer, (p, buffers), (x, state))[0]
        ys = torch.func.vmap(run)(params)
        y0 = torch.func.functional_call(layer, ({k: v[0] for k, v in params.items()}, buffers), (x, state))[0]
    torch.testing.assert_close(ys[0], y0)


def test_hooks_see_the_projections_and_act_on_every_path():
    torch.manual_seed(0)
    ttt = seqzoo.create_layer("ttt_linear", 16, num_heads=2).eval()
    seen = []
    ttt.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.clone()) or None)
    q_out = []
    ttt.q_proj.register_forward_hook(lambda m, i, o: q_out.append(o))
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        ttt(x)
    assert torch.equal(q_out[0], seen[0])  # RoPE did not rotate what a hook holds
    ttt.o_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    mamba = seqzoo.create_layer("mamba", 16).eval()
    mamba.in_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        for layer in (ttt, mamba):
            assert torch.count_nonzero(layer(x)[0]) == 0
            assert torch.count_nonzero(layer.step(x[:, 0], layer.init_state(1))[0]) == 0
