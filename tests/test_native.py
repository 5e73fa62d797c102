"""The native CPU kernels (the plugins' C sources, built by seqzoo.native) against the layers' torch paths, when
they apply, and when a built library may be loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from seqzoo_plugins.mamba import layer as mamba_plugin
from seqzoo_plugins.ttt import native_kernels as ttt_native

import seqzoo
from seqzoo import native

needs_native = pytest.mark.skipif(
    not (mamba_plugin.NATIVE.available() and ttt_native.LIB.available()),
    reason="no C compiler: the native kernels are off")


def decode(layer, x, state):
    """A decode step as generation takes it: through the layer's decoder (``layer.decoder``)."""
    return layer.decoder(x.shape[0]).step(x, state)


def _twins(name: str, torch_option: dict, **config):
    """A layer on the native path and its twin forced onto the torch path, with the same weights
    (perturbed away from the initialisation, so that zeros and ones do not hide mistakes)."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, **config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = seqzoo.create_layer(name, **config, **torch_option).eval()
    twin.load_state_dict(layer.state_dict())
    return layer, twin


def _decode(layer, x: torch.Tensor):
    state = layer.init_state(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, state = decode(layer, x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def _assert_decode_matches(layer, twin, x: torch.Tensor) -> None:
    """Token by token, ``layer`` (native) = ``twin`` (torch path), outputs and states; both = twin's forward."""
    y, state = _decode(layer, x)
    y_ref, state_ref = _decode(twin, x)
    y_fwd, state_fwd = twin(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y, y_fwd)
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key])
        torch.testing.assert_close(state[key], state_fwd[key])


def _spy(monkeypatch, name: str) -> list:
    """Count the calls of a kernel wrapper: the Mamba plugin's ``_mamba_step`` or the TTT plugin's."""
    calls = []
    module = mamba_plugin if name == "_mamba_step" else ttt_native
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


MAMBA_CONFIGS = [
    dict(d_model=48),
    dict(d_model=32, d_state=8, d_conv=3, use_gate=True),
    dict(d_model=40, d_state=5, expand=1, conv_bias=False, dt_rank=3),
]


@needs_native
@pytest.mark.parametrize("config", MAMBA_CONFIGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba_native_step_equals_torch_path(config, batch, monkeypatch):
    layer, twin = _twins("mamba", {"use_kernels": False}, **config)
    calls = _spy(monkeypatch, "_mamba_step")
    with torch.no_grad():
        _assert_decode_matches(layer, twin, torch.randn(batch, 21, config["d_model"]))
    assert len(calls) == 21


@needs_native
def test_mamba_native_step_takes_any_state_layout(monkeypatch):
    layer, twin = _twins("mamba", {"use_kernels": False}, d_model=32)
    x = torch.randn(2, 32)
    state = twin.init_state(2)
    state = {k: torch.randn(v.shape[::-1]).transpose(0, -1) for k, v in state.items()}  # not contiguous
    with torch.inference_mode():
        y, new = decode(layer, x, state)
        y_ref, new_ref = decode(twin, x, state)
    torch.testing.assert_close(y, y_ref)
    for key in new_ref:
        torch.testing.assert_close(new[key], new_ref[key])


@needs_native
def test_mamba_native_step_only_where_it_applies(monkeypatch):
    layer, _ = _twins("mamba", {"use_kernels": False}, d_model=32)
    calls = _spy(monkeypatch, "_mamba_step")
    x = torch.randn(1, 32)
    state = layer.init_state(1)
    decode(layer, x, state)  # autograd records: the torch path (the kernel has no backward)
    assert not calls
    with torch.no_grad():
        decode(layer.double(), x.double(), layer.init_state(1, dtype=torch.float64))  # float64
        assert not calls
        layer.float()
        handle = layer.x_proj.register_forward_hook(lambda m, i, o: o * 2)  # a hook the kernel could not run
        hooked, _ = decode(layer, x, state)
        assert not calls
        handle.remove()
        plain, _ = decode(layer, x, state)
        assert len(calls) == 1
    assert not torch.allclose(hooked, plain)  # the hook ran


TTT_CONFIGS = [
    dict(),
    dict(use_gate=True, share_qk=True),
    dict(rope=False, token_idx=False, learnable_lr=False),
    dict(post_norm=False, mini_batch_size=4, ttt_base_lr=0.5),
]


@needs_native
@pytest.mark.parametrize("config", TTT_CONFIGS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_ttt_native_step_equals_torch_path(name, config, batch, monkeypatch):
    layer, twin = _twins(name, {"backend": "torch"}, d_model=64, num_heads=4, **config)
    calls = _spy(monkeypatch, f"_{name}_token")
    with torch.inference_mode():
        _assert_decode_matches(layer, twin, torch.randn(batch, 37, 64))  # crosses mini-batch ends (W ← W̄)
    assert len(calls) == 37


@needs_native
@pytest.mark.parametrize(
    "d_model,num_heads",
    [
        (128, 2),  # head_dim 64: 64-column panels only
        (160, 2),  # head_dim 80: a panel and a 16-column rest
        (96, 2),  # head_dim 48: no whole panel for TTT-Linear (TTT-MLP's 192 hidden: three)
    ],
)
@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_ttt_native_step_equals_torch_path_across_head_widths(name, d_model, num_heads, monkeypatch):
    """The decode kernels' register panels (64 columns, a (k, q) pair of rows) and their scalar rests."""
    layer, twin = _twins(name, {"backend": "torch"}, d_model=d_model, num_heads=num_heads, mini_batch_size=8)
    calls = _spy(monkeypatch, f"_{name}_token")
    with torch.inference_mode():
        _assert_decode_matches(layer, twin, torch.randn(2, 19, d_model))  # two commits and a partial mini-batch
    assert len(calls) == 19


@needs_native
@pytest.mark.parametrize(
    "config,batch,length,prefix",
    [
        (dict(d_model=128, num_heads=2), 1, 64, 0),  # head_dim 64: the register-blocked products
        (dict(d_model=128, num_heads=2, mini_batch_size=8), 2, 45, 5),  # a head and a tail around the kernel
        (dict(d_model=64, num_heads=4), 2, 37, 0),  # head_dim 16: the generic loops
        (dict(d_model=64, num_heads=4, rope=False, token_idx=False, learnable_lr=False, mini_batch_size=4), 1, 33, 3),
    ],
)
@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_ttt_native_prefill_equals_torch_path(name, config, batch, length, prefix, monkeypatch):
    """forward's whole mini-batches through the native dual form = the torch dual form, outputs and states,
    also when the sequence starts inside a mini-batch (the state of a prefix) and ends inside one."""
    layer, twin = _twins(name, {"backend": "torch"}, **config)
    calls = _spy(monkeypatch, f"{name}_dual")
    x = torch.randn(batch, prefix + length, config["d_model"])
    with torch.no_grad():
        _, state = twin(x[:, :prefix])
        y, new = layer(x[:, prefix:], state)
        y_ref, new_ref = twin(x[:, prefix:], state)
    assert len(calls) == 1
    torch.testing.assert_close(y, y_ref)
    for key in new_ref:
        torch.testing.assert_close(new[key], new_ref[key])
    with torch.enable_grad():  # training: the same kernel, inside the written backward's Function
        y_grad, _ = layer(x[:, prefix:], state)
    assert len(calls) == 2 and y_grad.requires_grad
    torch.testing.assert_close(y_grad, y_ref)


@needs_native
def test_ttt_linear_native_step_calls_a_hooked_post_norm(monkeypatch):
    """post_norm is folded into the kernel only while it is a bare LayerNorm; a hooked one is called."""
    layer, twin = _twins("ttt_linear", {"backend": "torch"}, d_model=64, num_heads=4)
    for m in (layer, twin):
        m.post_norm.register_forward_hook(lambda mod, args, out: out * 2 + 1)
    calls = _spy(monkeypatch, "_ttt_linear_token")
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        y, _ = _decode(layer, x)
        y_ref, _ = _decode(twin, x)
    assert len(calls) == 20
    torch.testing.assert_close(y, y_ref)


@needs_native
def test_ttt_linear_native_step_only_where_it_applies(monkeypatch):
    calls = _spy(monkeypatch, "_ttt_linear_token")
    x = torch.randn(1, 64)
    for config in (dict(backend="torch"), dict(inner_norm=False)):
        layer = seqzoo.create_layer("ttt_linear", d_model=64, num_heads=4, **config).eval()
        with torch.no_grad():
            decode(layer, x, layer.init_state(1))
    layer = seqzoo.create_layer("ttt_linear", d_model=64, num_heads=4).eval()
    decode(layer, x, layer.init_state(1))  # autograd records
    with torch.no_grad():
        decode(layer.double(), x.double(), layer.init_state(1, dtype=torch.float64))
    assert not calls
    with torch.no_grad():
        decode(layer.float(), x, layer.init_state(1))
    assert len(calls) == 1


_LIBRARIES = ("from seqzoo_plugins.mamba import NATIVE; from seqzoo_plugins.ttt.native_kernels import LIB; "
              "print(NATIVE.available(), LIB.available())")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True)


def test_native_off_by_environment(tmp_path):
    out = _python(_LIBRARIES, SEQZOO_NATIVE="0", SEQZOO_CACHE_DIR=str(tmp_path))
    assert out.stdout.split() == ["False", "False"]
    assert not any(tmp_path.iterdir())  # nothing was built


def test_native_without_a_compiler_uses_the_torch_paths(tmp_path):
    code = (
        "import torch, seqzoo; from seqzoo_plugins.mamba import NATIVE; print(NATIVE.available());"
        "m = seqzoo.create_layer('mamba', d_model=16).eval();"
        "torch.no_grad().__enter__(); y, s = m.decoder(1).step(torch.randn(1, 16), m.init_state(1)); print(tuple(y.shape))"
    )
    out = _python(code, CC=str(tmp_path / "no-such-compiler"), SEQZOO_CACHE_DIR=str(tmp_path))
    assert out.stdout.split() == ["False", "(1,", "16)"]
    assert "native CPU kernels unavailable" in out.stderr


@needs_native
def test_native_build_is_cached_per_library(tmp_path):
    for _ in range(2):
        assert _python(_LIBRARIES, SEQZOO_CACHE_DIR=str(tmp_path)).stdout.split() == ["True", "True"]
        built = sorted((tmp_path / "native").iterdir())
        # one library per plugin, no temporary left behind, readable and writable by this user only
        assert [p.name.split("-")[0] for p in built] == ["mamba", "ttt"]
        assert all(p.suffix == ".so" and native.trusted(p, folder=False) for p in built)
    assert (tmp_path / "native").stat().st_mode & 0o777 == 0o700


@needs_native
def test_native_refuses_a_cache_that_others_can_write(tmp_path):
    """A cache folder others can write (or a symlink to one) is not loaded from: the library is built in a
    private folder of the process instead, and a warning says why."""
    shared = tmp_path / "cache" / "native"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    out = _python(_LIBRARIES, SEQZOO_CACHE_DIR=str(tmp_path / "cache"))
    assert out.stdout.split() == ["True", "True"]
    assert "not a folder of this user that only it can write" in out.stderr
    assert not any(shared.iterdir())  # nothing built where others could swap it
    shared.chmod(0o700)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "native").symlink_to(shared)
    out = _python(_LIBRARIES, SEQZOO_CACHE_DIR=str(tmp_path / "link"))
    assert out.stdout.split() == ["True", "True"] and "building in a private folder" in out.stderr
    assert not any(shared.iterdir())


@needs_native
def test_native_never_loads_a_library_it_cannot_trust(tmp_path):
    """A library file that others can write is not loaded (here a planted file of garbage: loading it
    would fail); the kernels are built and loaded from a private folder instead."""
    assert _python(_LIBRARIES, SEQZOO_CACHE_DIR=str(tmp_path)).stdout.split() == ["True", "True"]
    for lib in (tmp_path / "native").iterdir():
        lib.write_bytes(b"not a library")
        lib.chmod(0o666)
    out = _python(_LIBRARIES, SEQZOO_CACHE_DIR=str(tmp_path))
    assert out.stdout.split() == ["True", "True"]
    assert out.stderr.count("not a file of this user that only it can write") == 2


def test_trusted_is_sshs_rule(tmp_path, monkeypatch):
    mine = tmp_path / "lib.so"
    mine.write_bytes(b"")
    mine.chmod(0o700)
    assert native.trusted(mine, folder=False) and not native.trusted(mine, folder=True)
    for mode in (0o720, 0o702, 0o777):
        mine.chmod(mode)
        assert not native.trusted(mine, folder=False), oct(mode)
    mine.chmod(0o700)
    (tmp_path / "link.so").symlink_to(mine)
    assert not native.trusted(tmp_path / "link.so", folder=False)
    assert not native.trusted(tmp_path / "missing.so", folder=False)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(mine).st_uid + 1)  # another user's file
    assert not native.trusted(mine, folder=False)


def test_library_signatures_are_typed():
    """A kernel's arguments are typed: a wrong one raises in Python instead of reaching C."""
    with pytest.raises(TypeError, match="I32, I64, F32 and PTR"):
        native.signature(native.I32, [int])
    lib = native.Library("probe", [], {"f": (native.I32, [native.I64, native.PTR])})
    with pytest.raises(AttributeError, match="declares no function 'g'"):
        lib.g  # noqa: B018
    with pytest.raises(ValueError, match="letters, digits"):
        native.Library("../evil", [], {})


@needs_native
def test_kernel_arguments_are_checked_by_ctypes():
    import ctypes

    with pytest.raises(ctypes.ArgumentError):
        mamba_plugin.NATIVE.sz_mamba_step(1.5, *([0] * 19))  # a float where the batch size (int64) goes
    with pytest.raises(ctypes.ArgumentError):
        mamba_plugin.NATIVE.sz_mamba_step(*([1] * 6), torch.zeros(1), *([0] * 13))  # a tensor for a pointer


@needs_native
def test_native_functions_refuse_what_they_cannot_read():
    """The kernels read raw float32 memory: wrong dtypes, devices and shapes are refused with a reason."""
    layer = seqzoo.create_layer("mamba", d_model=16).eval()
    state = layer.init_state(1)
    params = (layer.conv1d.weight, layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
              layer.dt_proj.bias, layer.A_log, layer.D)
    xz = torch.randn(1, 2 * layer.d_inner)
    with torch.no_grad():
        mamba_plugin.mamba_step(xz, state["conv_state"], state["ssm_state"], *params)  # the right call works
        with pytest.raises(TypeError, match="float32 CPU"):
            mamba_plugin.mamba_step(xz.double(), state["conv_state"], state["ssm_state"], *params)
        with pytest.raises(ValueError, match="inconsistent shapes"):
            mamba_plugin.mamba_step(xz[:, :-1], state["conv_state"], state["ssm_state"], *params)
        with pytest.raises(ValueError, match="inconsistent shapes"):
            mamba_plugin.mamba_step(xz, state["conv_state"][..., :0], state["ssm_state"], *params)
    ttt = seqzoo.create_layer("ttt_linear", d_model=16, num_heads=2).eval()
    st = ttt.init_state(1)
    q = torch.randn(1, 2, 8)
    args = dict(x=torch.randn(1, 16), lr_w=ttt.learnable_ttt_lr_weight, lr_b=ttt.learnable_ttt_lr_bias, lr_base=0.1,
                rope=None, token_idx=ttt.learnable_token_idx, p=3, W=st["W1"], b=st["b1"], GW=st["W1_grad"],
                Gb=st["b1_grad"], ln_w=ttt.ttt_norm_weight, ln_b=ttt.ttt_norm_bias, eps=1e-6, commit=False)
    with torch.no_grad():
        ttt_native.ttt_linear_token(q, q, q, **args)
        with pytest.raises(ValueError, match="position 16"):
            ttt_native.ttt_linear_token(q, q, q, **{**args, "p": 16})
        with pytest.raises(ValueError, match="got shapes"):
            ttt_native.ttt_linear_token(q, q[..., :4], q, **args)
        with pytest.raises(TypeError, match="float32 CPU"):
            ttt_native.ttt_linear_token(q, q, q, **{**args, "W": st["W1"].double()})


@pytest.mark.parametrize("name", ["mamba", "ttt_linear"])
def test_native_paths_validate_like_the_torch_paths(name):
    """Without autograd (where the native paths run) a bad state or input still gets the layer's own error."""
    layer = seqzoo.create_layer(name, d_model=32).eval()
    state = layer.init_state(2)
    with torch.no_grad():
        broken = dict(state)
        broken.pop(next(iter(broken)))
        with pytest.raises(ValueError, match="expected a state with keys"):
            decode(layer, torch.randn(2, 32), broken)
        with pytest.raises(ValueError, match="expected x of shape"):
            decode(layer, torch.randn(2, 31), state)
        with pytest.raises(ValueError, match="shape"):
            decode(layer, torch.randn(3, 32), state)  # a state of batch 2 for a batch of 3


@needs_native
@pytest.mark.parametrize("name", ["mamba", "ttt_linear", "ttt_mlp"])
def test_step_fits_is_what_check_input_accepts_for_float32_cpu(name):
    """native.step_fits: the hot path's non-raising check of x and the state, no looser than check_input."""
    layer = seqzoo.create_layer(name, d_model=32, **({} if name == "mamba" else {"num_heads": 2}))
    state, x = layer.init_state(2), torch.randn(2, 32)
    assert not native.step_fits(layer, x, state)  # autograd records: no kernel may run
    with torch.no_grad():  # where the native paths run
        assert native.step_fits(layer, x, state)
        key = next(iter(state))
        refused = [
            (x, [state]),  # not a dict
            (x, {k: v for k, v in state.items() if k != key}),  # a key missing
            (x, {**state, "extra": torch.zeros(1)}),  # a key too many
            (x, {**state, key: state[key][:1]}),  # another batch size
            (x, {**state, key: state[key].double()}),  # another dtype
            (x, {**state, key: state[key].tolist()}),  # not a tensor
            (torch.randn(3, 32), state),  # a state of batch 2 for a batch of 3
            (torch.randn(2, 31), state),  # another width
            (torch.randn(2, 1, 32), state),  # a sequence, not a token
            (x.tolist(), state),  # not a tensor
        ]
        for bad_x, bad_state in refused:
            assert not native.step_fits(layer, bad_x, bad_state)
            with pytest.raises((ValueError, TypeError)):
                layer.check_input(bad_x, bad_state, step=True)
        # valid for check_input, for the torch path only: float64 (the kernels are float32), a tensor subclass
        # (they read raw memory)
        assert not native.step_fits(layer, x.double(), layer.init_state(2, dtype=torch.float64))
        assert not native.step_fits(layer, x, {**state, key: torch.nn.Parameter(state[key])})


@needs_native
@pytest.mark.parametrize(("name", "proj", "width"), [("ttt_linear", "q_proj", 64), ("ttt_linear", "k_proj", 16),
                                                     ("ttt_linear", "k_proj", 64), ("ttt_mlp", "v_proj", 16)])
def test_a_projection_of_another_width_never_reaches_a_kernel(name, proj, width, monkeypatch):
    """The kernel reads H·d values per row of q, k and v: a projection with another number of outputs gets
    the torch path, which raises (instead of a kernel reading or writing past the state's memory)."""
    layer = seqzoo.create_layer(name, d_model=32, num_heads=2).eval()
    setattr(layer, proj, torch.nn.Linear(32, width, bias=False))
    calls = _spy(monkeypatch, f"_{name}_token")
    with torch.no_grad(), pytest.raises(RuntimeError):
        decode(layer, torch.randn(2, 32), layer.init_state(2))
    assert not calls


@needs_native
@pytest.mark.parametrize(("name", "proj", "kernel_calls"), [
    ("mamba", "x_proj", 0), ("mamba", "in_proj", 0), ("ttt_linear", "q_proj", 0),
    ("ttt_linear", "o_proj", 1),  # (o_proj is called after the kernel)
])
def test_a_projection_without_its_bias_gets_the_torch_path(name, proj, kernel_calls, monkeypatch):
    """The native step reads the projections' registered weight and bias; with one deleted it steps aside
    and the torch path raises what calling the module raises."""
    layer = seqzoo.create_layer(name, d_model=32, **({} if name == "mamba" else {"num_heads": 2})).eval()
    calls = _spy(monkeypatch, "_mamba_step" if name == "mamba" else "_ttt_linear_token")
    x = torch.randn(2, 32)
    with torch.no_grad():
        decode(layer, x, layer.init_state(2))
        assert len(calls) == 1
        del getattr(layer, proj).bias
        with pytest.raises(AttributeError, match="bias"):
            decode(layer, x, layer.init_state(2))
    assert len(calls) == 1 + kernel_calls


@needs_native
@pytest.mark.parametrize("name", ["mamba", "ttt_linear"])
def test_native_step_honours_an_overridden_state_check(name, monkeypatch):
    """The native step stands in for check_input / check_state: a subclass that overrides one gets the
    torch path, which calls it."""
    calls = _spy(monkeypatch, "_mamba_step" if name == "mamba" else "_ttt_linear_token")
    base = type(seqzoo.create_layer(name, d_model=32, **({} if name == "mamba" else {"num_heads": 2})))
    seen = []

    class Strict(base):
        def check_state(self, state, batch_size, *, device, dtype):
            seen.append(batch_size)
            super().check_state(state, batch_size, device=device, dtype=dtype)

    kwargs = {} if name == "mamba" else {"learner": seqzoo.create_layer(name, d_model=32, num_heads=2).learner.__class__,
                                         "num_heads": 2}
    layer = Strict(32, **kwargs).eval()
    with torch.no_grad():
        decode(layer, torch.randn(1, 32), layer.init_state(1))
    assert seen == [1] and not calls


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_ttt_native_step_checks_the_position_like_the_torch_path(name):
    layer = seqzoo.create_layer(name, d_model=32, num_heads=2, mini_batch_size=4).eval()
    state = layer.init_state(2)
    with torch.no_grad():
        for pos, match in (([4, 4], r"pos'\] in \[0, 4\)"), ([1, 2], "same position")):
            with pytest.raises(ValueError, match=match):
                decode(layer, torch.randn(2, 32), {**state, "pos": torch.tensor(pos)})
        with pytest.raises(ValueError, match="mini_batch_size=4"):
            decode(layer, torch.randn(2, 32), {**state, "mini_batch_size": torch.tensor([16, 16])})


@needs_native
def test_native_steps_step_aside_for_parameters_of_other_shapes(monkeypatch):
    """A parameter replaced by one of another shape is never read by a kernel: the torch path runs (and
    says what does not fit)."""
    mamba_calls, token_calls = _spy(monkeypatch, "_mamba_step"), _spy(monkeypatch, "_ttt_linear_token")
    x = torch.randn(1, 32)
    ttt = seqzoo.create_layer("ttt_linear", d_model=32, num_heads=2).eval()
    mamba = seqzoo.create_layer("mamba", d_model=32).eval()
    with torch.no_grad():
        ttt.ttt_norm_weight = torch.nn.Parameter(torch.ones(2, 8))
        with pytest.raises(RuntimeError):
            decode(ttt, x, ttt.init_state(1))
        mamba.D = torch.nn.Parameter(torch.ones(8))
        with pytest.raises(RuntimeError):
            decode(mamba, x, mamba.init_state(1))
    assert not mamba_calls and not token_calls


@needs_native
def test_native_paths_step_aside(monkeypatch):
    """Where the kernels do not apply, the torch path runs and works: autocast, a missing dt bias, a
    subclass overriding a method of the torch step, a mini-batch longer than any kernel array."""
    mamba_calls, token_calls = _spy(monkeypatch, "_mamba_step"), _spy(monkeypatch, "_ttt_linear_token")
    x = torch.randn(1, 32)
    mamba = seqzoo.create_layer("mamba", d_model=32).eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = decode(mamba, x, mamba.init_state(1))
        mamba.dt_proj.bias = None
        decode(mamba, x, mamba.init_state(1))
        ttt = seqzoo.create_layer("ttt_linear", d_model=32, num_heads=2, mini_batch_size=1100).eval()
        ttt(torch.randn(1, 3, 32))
        decode(ttt, x, ttt.init_state(1))  # the mini-batch position is still < 1024: the kernel runs
        assert len(token_calls) == 1

        class Halved(type(ttt)):  # a subclass that changes the output rule
            def _output(self, x, z):
                return super()._output(x, z) / 2

        halved = Halved(32, learner=ttt.learner.__class__, num_heads=2).eval()
        decode(halved, x, halved.init_state(1))
    assert y.dtype == torch.bfloat16 and not mamba_calls and len(token_calls) == 1


@needs_native
def test_native_refuses_shapes_its_arrays_cannot_hold():
    layer = seqzoo.create_layer("mamba", d_model=16).eval()
    state = layer.init_state(1)
    conv_w = layer.conv1d.weight[..., :0]  # a conv of no taps
    with torch.no_grad(), pytest.raises(ValueError, match="K >= 1"):
        mamba_plugin.mamba_step(torch.randn(1, 2 * layer.d_inner), state["conv_state"], state["ssm_state"], conv_w,
                          layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight, layer.dt_proj.bias,
                          layer.A_log, layer.D)
    q = torch.randn(1, 1, 3)  # an odd head with RoPE
    W, b = torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 1, 3)
    with pytest.raises(ValueError, match="even with RoPE"):
        ttt_native.ttt_linear_token(q, q, q, torch.randn(1, 3), None, None, 0.1, torch.zeros(4, 1, 2), None, 3, W, b, W, b,
                                torch.ones(1, 3), torch.zeros(1, 3), 1e-6, False)
    mlp = [torch.zeros(1, 1, 3, 12), torch.zeros(1, 1, 1, 12), torch.zeros(1, 1, 12, 3), torch.zeros(1, 1, 1, 3)]
    with pytest.raises(ValueError, match="even with RoPE"):
        ttt_native.ttt_mlp_token(q, q, q, torch.randn(1, 3), None, None, 0.1, torch.zeros(4, 1, 2), None, 3, mlp, mlp,
                             torch.ones(1, 3), torch.zeros(1, 3), 1e-6, False)
    with pytest.raises(ValueError, match="got shapes"):
        ttt_native.ttt_mlp_token(q, q, q, torch.randn(1, 3), None, None, 0.1, None, None, 3, mlp, mlp[::-1],
                             torch.ones(1, 3), torch.zeros(1, 3), 1e-6, False)


@needs_native
def test_native_mamba_step_passes_nan_through():
    """A NaN in Δ gives NaN out, as on the torch path (the harness reports NaN runs; it must see them)."""
    layer, twin = _twins("mamba", {"use_kernels": False}, d_model=32)
    with torch.no_grad():
        for m in (layer, twin):
            m.dt_proj.bias[0] = float("nan")
        y, state = decode(layer, torch.randn(1, 32), layer.init_state(1))
        y_ref, state_ref = decode(twin, torch.randn(1, 32), twin.init_state(1))
    assert torch.isnan(y).any() and torch.isnan(y_ref).any()
    assert torch.isnan(state["ssm_state"]).any() and torch.isnan(state_ref["ssm_state"]).any()


@needs_native
def test_step_is_the_torch_path_and_the_decoder_takes_the_kernel(monkeypatch):
    """``step`` is the plain update rule (it never switches to a kernel); the layer's decoder is where the
    native path is taken, and both give the same numbers."""
    mamba_calls, token_calls = _spy(monkeypatch, "_mamba_step"), _spy(monkeypatch, "_ttt_linear_token")
    for name, calls in (("mamba", mamba_calls), ("ttt_linear", token_calls)):
        layer = seqzoo.create_layer(name, d_model=32).eval()
        x, state = torch.randn(2, 32), layer.init_state(2)
        with torch.no_grad():
            y_step, s_step = layer.step(x, state)
            assert not calls
            y_dec, s_dec = layer.decoder(2).step(x, state)
            assert len(calls) == 1
        torch.testing.assert_close(y_dec, y_step)
        for key in s_step:
            torch.testing.assert_close(s_dec[key], s_step[key])
    assert type(seqzoo.create_layer("rnn", 8).decoder(1)) is seqzoo.contract.Decoder  # no kernel: step
    with pytest.raises(ValueError, match="batch_size"):
        seqzoo.create_layer("mamba", 8).decoder(0)


@needs_native
@pytest.mark.parametrize("name", ["mamba", "ttt_linear"])
def test_generate_decodes_through_the_layers_decoders(monkeypatch, name):
    """Generation steps every block's layer through its decoder (the kernel) and samples what the plain
    steps (the torch path) give."""
    calls = _spy(monkeypatch, "_mamba_step" if name == "mamba" else "_ttt_linear_token")
    torch.manual_seed(0)
    lm = seqzoo.create_model(name, vocab_size=40, d_model=32, n_layers=2).eval()
    prompt = torch.randint(0, 40, (2, 5))
    out = lm.generate(prompt, 6, temperature=0)
    assert len(calls) == 2 * 6  # two blocks, six new tokens
    with torch.no_grad():  # the same greedy tokens through plain steps
        logits, state = lm(prompt)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(5):
            logits, state = lm.step(tokens[-1], state)
            tokens.append(logits.argmax(-1))
    assert torch.equal(out[:, 5:], torch.stack(tokens, 1))
    assert len(calls) == 2 * 6


def test_over_rows_covers_every_row_once_also_after_a_fork():
    """native.over_rows: disjoint ranges covering [0, rows), in order, also in a forked child (a DataLoader
    worker, say) of a process whose pool has run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = native.over_rows(lambda lo, hi: list(range(lo, hi)), 7)
        one = native.over_rows(lambda lo, hi: (lo, hi), 1)
    finally:
        torch.set_num_threads(threads)
    assert [r for part in seen for r in part] == list(range(7)) and len(seen) == 2
    assert one == [(0, 1)]
    if not hasattr(os, "fork") or threads < 2:
        return
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the calls ran
        try:
            ok = sum(native.over_rows(lambda lo, hi: hi - lo, 4)) == 4
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
