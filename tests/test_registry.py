"""The registry: entry points, isolation of broken plugins, conflicts, close-match errors."""

import sys
import textwrap
import types

import pytest
import torch

import seqzoo
import seqzoo.interop
from seqzoo.registry import REGISTRY


def _fake_distribution(tmp_path, dist_name, ep_name, module_name, module_source):
    """Install, on sys.path only, a distribution whose "seqzoo" entry point is ``module_name``."""
    pkg = tmp_path / f"{module_name}.py"
    pkg.write_text(textwrap.dedent(module_source))
    info = tmp_path / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[seqzoo]\n{ep_name} = {module_name}\n")
    return str(tmp_path)


@pytest.fixture
def on_path(monkeypatch):
    added = []

    def add(path):
        monkeypatch.syspath_prepend(path)
        added.append(path)

    yield add
    for mod in [m for m in sys.modules if m.startswith("zoo_fake_")]:
        del sys.modules[mod]
    monkeypatch.undo()
    seqzoo.reload_plugins()


def test_builtins_are_registered_through_entry_points():
    names = seqzoo.list_layers()
    assert "rnn" in names
    spec = seqzoo.layer_spec("rnn")
    assert spec.plugin == "rnn" and spec.distribution == "seqzoo"
    assert [f.name for f in spec.fields] == ["state_dim"]


def test_list_layers_pattern():
    assert seqzoo.list_layers("rn*") == ["rnn"]
    assert seqzoo.list_layers("no_such_*") == []


def test_unknown_layer_names_close_match():
    with pytest.raises(KeyError, match="did you mean rnn"):
        seqzoo.create_layer("rnnn", 8)


def test_unknown_config_key_names_close_match():
    with pytest.raises(TypeError, match="did you mean state_dim"):
        seqzoo.create_layer("rnn", 8, state_dimm=4)


def test_inline_plugin_registers_and_unregisters():
    class Identity(seqzoo.SequenceLayer):
        def init_state(self, batch_size, *, device=None, dtype=None):
            return {}

        def forward(self, x, state=None):
            return x, self.check_input(x, state)

        def step(self, x, state):
            return x, self.check_input(x, state, step=True)

        def state_size(self, seq_len):
            return 0

    plugin = types.SimpleNamespace(register_layers=seqzoo.hookimpl(lambda register: register("zoo_identity", Identity)))
    info = seqzoo.register_plugin(plugin, name="zoo-inline")
    try:
        assert info.error is None and info.layers == ["zoo_identity"]
        layer = seqzoo.create_layer("zoo_identity", 4)
        x = torch.randn(2, 3, 4)
        assert torch.equal(layer(x)[0], x)
    finally:
        seqzoo.unregister_plugin("zoo-inline")
    assert "zoo_identity" not in seqzoo.list_layers()


def test_plugin_that_fails_to_import_is_reported_and_others_load(tmp_path, on_path):
    on_path(_fake_distribution(tmp_path, "zoo-broken", "broken", "zoo_fake_broken",
                               "raise ImportError('needs a package that is not installed')\n"))
    seqzoo.reload_plugins()
    failures = seqzoo.plugin_failures()
    assert "broken" in failures and "needs a package that is not installed" in failures["broken"]
    assert "rnn" in seqzoo.list_layers()
    info = {p.name: p for p in seqzoo.list_plugins()}["broken"]
    assert info.distribution == "zoo-broken" and info.version == "1.0"


def test_plugin_whose_hook_raises_registers_nothing(tmp_path, on_path):
    on_path(_fake_distribution(tmp_path, "zoo-half", "half", "zoo_fake_half", """
        import seqzoo
        from seqzoo_plugins.rnn import NaiveRNN

        @seqzoo.hookimpl
        def register_layers(register):
            register("zoo_half_layer", NaiveRNN)
            raise RuntimeError("boom after one registration")
    """))
    seqzoo.reload_plugins()
    assert "boom after one registration" in seqzoo.plugin_failures()["half"]
    assert "zoo_half_layer" not in seqzoo.list_layers()
    assert "rnn" in seqzoo.list_layers()


def test_name_conflict_names_both_plugins(tmp_path, on_path):
    on_path(_fake_distribution(tmp_path, "zoo-thief", "thief", "zoo_fake_thief", """
        import seqzoo

        @seqzoo.hookimpl
        def register_layers(register):
            register("rnn", lambda d_model: None)
    """))
    seqzoo.reload_plugins()
    msg = seqzoo.plugin_failures()["thief"]
    assert "'rnn'" in msg and "'thief'" in msg
    # the original keeps its name
    assert seqzoo.layer_spec("rnn").plugin == "rnn"


def test_converters_are_registered_by_their_plugins_and_reached_through_interop():
    """seqzoo.interop names no layer: each converter is registered beside its layers."""
    from seqzoo_plugins.delta.titans import from_titans_pytorch
    from seqzoo_plugins.mamba.interop import from_mamba_ssm
    from seqzoo_plugins.ttt.interop import from_ttt_lm_pytorch

    assert seqzoo.list_converters() == ["from_mamba_ssm", "from_titans_pytorch", "from_ttt_lm_pytorch"]
    assert seqzoo.interop.from_mamba_ssm is from_mamba_ssm
    assert seqzoo.interop.from_titans_pytorch is from_titans_pytorch
    assert seqzoo.converter("from_ttt_lm_pytorch").plugin == "ttt"
    assert seqzoo.converter("from_titans_pytorch").plugin == "delta"
    from seqzoo.interop import from_ttt_lm_pytorch as reached  # from-imports work too

    assert reached is from_ttt_lm_pytorch
    assert {"from_mamba_ssm", "from_ttt_lm_pytorch"} <= set(dir(seqzoo.interop))
    with pytest.raises(AttributeError, match="did you mean from_mamba_ssm"):
        seqzoo.interop.from_mamba_sm  # noqa: B018


def test_a_plugin_adds_a_converter_and_a_conflicting_one_is_refused(tmp_path, on_path):
    on_path(_fake_distribution(tmp_path, "zoo-conv", "zoo-conv", "zoo_fake_conv", """
        import seqzoo

        def from_zoo(state_dict, config):
            \"\"\"A zoo checkpoint as a seqzoo model.\"\"\"
            return "converted"

        @seqzoo.hookimpl
        def register_converters(register):
            register("from_zoo", from_zoo)
            register("from_mamba_ssm", from_zoo)
    """))
    seqzoo.reload_plugins()
    msg = seqzoo.plugin_failures()["zoo-conv"]
    assert "converter name 'from_mamba_ssm'" in msg and "'mamba'" in msg and "'zoo-conv'" in msg
    assert seqzoo.interop.from_zoo({}, {}) == "converted"
    assert seqzoo.converter("from_zoo").description == "A zoo checkpoint as a seqzoo model."
    assert seqzoo.converter("from_mamba_ssm").plugin == "mamba"  # the original keeps its name


def test_converter_names_are_checked():
    plugin = types.SimpleNamespace(register_converters=seqzoo.hookimpl(
        lambda register: register("not a name", print)))
    seqzoo.register_plugin(plugin, name="zoo-bad-converter")
    try:
        assert "public Python identifier" in seqzoo.plugin_failures()["zoo-bad-converter"]
    finally:
        seqzoo.unregister_plugin("zoo-bad-converter")


def test_strict_mode_raises(tmp_path, on_path, monkeypatch):
    on_path(_fake_distribution(tmp_path, "zoo-broken2", "broken2", "zoo_fake_broken2", "raise ImportError('nope')\n"))
    monkeypatch.setenv("SEQZOO_STRICT_PLUGINS", "1")
    with pytest.raises(RuntimeError, match="broken2.*nope"):
        seqzoo.reload_plugins()
    monkeypatch.delenv("SEQZOO_STRICT_PLUGINS")


def test_factory_must_return_a_sequence_layer():
    plugin = types.SimpleNamespace(register_layers=seqzoo.hookimpl(
        lambda register: register("zoo_bad_factory", lambda d_model: torch.nn.Linear(d_model, d_model))))
    seqzoo.register_plugin(plugin, name="zoo-bad-factory")
    try:
        with pytest.raises(TypeError, match="not a SequenceLayer"):
            seqzoo.create_layer("zoo_bad_factory", 4)
    finally:
        seqzoo.unregister_plugin("zoo-bad-factory")


def test_registered_learner_becomes_ttt_layer_name():
    class Dummy(seqzoo.Learner):
        @classmethod
        def layer_config(cls):
            from dataclasses import make_dataclass

            return make_dataclass("DummyConfig", [("num_heads", int, 1)])

        @classmethod
        def make_layer(cls, d_model, **config):
            from seqzoo_plugins.rnn import NaiveRNN

            return NaiveRNN(d_model)

    plugin = types.SimpleNamespace(register_learners=seqzoo.hookimpl(lambda register: register("zoo_dummy", Dummy)))
    seqzoo.register_plugin(plugin, name="zoo-learner")
    try:
        spec = seqzoo.layer_spec("ttt_zoo_dummy")
        assert spec.kind == "learner" and spec.field_names() == ["num_heads"]
        assert isinstance(seqzoo.create_layer("ttt_zoo_dummy", 8, num_heads=1), seqzoo.SequenceLayer)
    finally:
        seqzoo.unregister_plugin("zoo-learner")
    assert REGISTRY.layers.get("ttt_zoo_dummy") is None


def test_config_values_are_type_checked():
    with pytest.raises(TypeError, match=r"state_dim.*expects.*'4'"):
        seqzoo.create_layer("rnn", 8, state_dim="4")
    with pytest.raises(TypeError, match="state_dim"):
        seqzoo.create_layer("rnn", 8, state_dim=True)
    assert seqzoo.create_layer("rnn", 8, state_dim=None).state_dim == 8


def test_every_package_ships():
    """pyproject.toml lists its packages by hand (the plugins live under another folder name): every
    folder with an __init__.py is listed, so a plain (non-editable) install has every plugin."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: root / path for name, path in config["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(config["packages"])
