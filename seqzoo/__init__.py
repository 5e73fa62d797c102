"""seqzoo: sequence-modelling layers behind one contract (initial state, update rule, output rule)."""

from .backbones import LanguageModel, create_model
from .contract import SequenceLayer, State
from .learner import GradientLearner, Learner
from .registry import (
    LayerSpec,
    converter,
    create_layer,
    hookimpl,
    layer_spec,
    list_converters,
    list_layers,
    list_plugins,
    list_tasks,
    plugin_failures,
    register_plugin,
    reload_plugins,
    task_spec,
    unregister_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "SequenceLayer",
    "State",
    "Learner",
    "GradientLearner",
    "LayerSpec",
    "LanguageModel",
    "converter",
    "create_layer",
    "create_model",
    "hookimpl",
    "layer_spec",
    "list_converters",
    "list_layers",
    "list_plugins",
    "list_tasks",
    "plugin_failures",
    "register_plugin",
    "reload_plugins",
    "task_spec",
    "unregister_plugin",
    "__version__",
]
