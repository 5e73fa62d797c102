"""The plugin registry: pluggy hooks fed by the ``seqzoo`` entry-point group.

Every plugin, built-in or third-party, is a module with ``@seqzoo.hookimpl`` functions::

    @seqzoo.hookimpl
    def register_layers(register):
        register("my_layer", MyLayer, description="...")

Each plugin is imported and its hooks are called in isolation: one that fails is recorded (see
``plugin_failures``) and the others still load. ``SEQZOO_STRICT_PLUGINS=1`` turns failures into errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.metadata
import inspect
import logging
import os
import threading
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

log = logging.getLogger(__name__)

GROUP = "seqzoo"
hookspec = pluggy.HookspecMarker(GROUP)
hookimpl = pluggy.HookimplMarker(GROUP)
"""Marks a plugin's hook functions: ``@seqzoo.hookimpl def register_layers(register): ...`` (also
``register_learners``, ``register_tasks``, ``register_converters``; see ``HookSpecs``)."""

__all__ = [
    "hookimpl",
    "ConfigField",
    "LayerSpec",
    "TaskSpec",
    "ConverterSpec",
    "PluginInfo",
    "list_layers",
    "layer_spec",
    "create_layer",
    "list_tasks",
    "task_spec",
    "list_converters",
    "converter",
    "list_plugins",
    "plugin_failures",
    "register_plugin",
    "unregister_plugin",
    "reload_plugins",
]


class HookSpecs:
    @hookspec
    def register_layers(self, register):
        """Register layers: ``register(name, factory, *, config=None, description="", aliases=())``.

        ``factory(d_model, **config)`` returns a ``SequenceLayer``; ``config`` is an optional
        dataclass whose fields are the layer's options (otherwise they are read off the factory's
        keyword arguments).
        """

    @hookspec
    def register_learners(self, register):
        """Register learners: ``register(name, learner_cls, *, description="")``; becomes ``ttt_<name>``."""

    @hookspec
    def register_tasks(self, register):
        """Register harness tasks: ``register(name, factory, *, description="")``."""

    @hookspec
    def register_converters(self, register):
        """Register checkpoint converters: ``register(name, function, *, description="")``; reached as
        ``seqzoo.interop.<name>`` (e.g. ``from_mamba_ssm(state_dict, config)`` -> a ``LanguageModel``)."""


@dataclass(frozen=True)
class ConfigField:
    name: str
    type: Any
    default: Any
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def type_name(self) -> str:
        t = self.type
        return t if isinstance(t, str) else getattr(t, "__name__", str(t))


@dataclass(frozen=True)
class LayerSpec:
    """What the registry knows of a layer: enough to list and describe it without building one."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
    distribution: str = ""
    version: str = ""
    aliases: tuple[str, ...] = ()
    config: type | None = None
    kind: str = "layer"  # "layer" or "learner"
    target: Any = None  # the registered object (factory or learner class), for identity checks

    @property
    def fields(self) -> list[ConfigField]:
        """The config fields: from the config dataclass, or the factory's keyword arguments."""
        if self.config is not None:
            out = []
            for f in dataclasses.fields(self.config):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = dataclasses.MISSING
                out.append(ConfigField(f.name, f.type, default, f.metadata.get("help", "")))
            return out
        return _signature_fields(self.factory)

    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class ConverterSpec:
    name: str
    function: Callable[..., Any]
    description: str = ""
    plugin: str = ""


@dataclass
class PluginInfo:
    name: str
    module: str = ""
    distribution: str = ""
    version: str = ""
    layers: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    converters: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None


def _signature_fields(factory: Callable) -> list[ConfigField]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    out = []
    params = list(sig.parameters.values())
    if inspect.isclass(factory):
        params = params[1:]  # self
    for i, p in enumerate(params):
        if i == 0 or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "d_model":
            continue  # the first positional is d_model
        default = dataclasses.MISSING if p.default is p.empty else p.default
        ann = p.annotation if p.annotation is not p.empty else type(default).__name__
        out.append(ConfigField(p.name, ann, default))
    return out


def _close(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _strict() -> bool:
    return os.environ.get("SEQZOO_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


class _Stage:
    """What one plugin registers through one hook, kept apart until the hook returns: a hook that raises
    commits nothing. Each method is the ``register`` callable of one hook (``HOOKS``)."""

    HOOKS = {"register_layers": "layer", "register_learners": "learner", "register_tasks": "task",
             "register_converters": "converter"}

    def __init__(self, info: PluginInfo):
        self.info = info
        self.items: list[tuple[str, Any]] = []

    def layer(self, name: str, factory: Callable, *, config: type | None = None, description: str = "",
              aliases: tuple[str, ...] | list[str] = ()) -> None:
        _check_name(name)
        if not callable(factory):
            raise TypeError(f"register({name!r}, ...): factory must be callable, got {factory!r}")
        if config is None and inspect.isclass(factory):
            config = getattr(factory, "Config", None)
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"register({name!r}, ...): config must be a dataclass, got {config!r}")
        info = self.info
        self.items.append(("layer", LayerSpec(
            name=name, factory=factory, description=description or _first_line(factory),
            plugin=info.name, distribution=info.distribution, version=info.version,
            aliases=tuple(aliases), config=config, kind="layer", target=factory,
        )))

    def learner(self, name: str, learner_cls: type, *, description: str = "") -> None:
        from .learner import Learner

        _check_name(name)
        if not (inspect.isclass(learner_cls) and issubclass(learner_cls, Learner)):
            raise TypeError(f"register({name!r}, ...): expected a seqzoo.Learner subclass, got {learner_cls!r}")
        info = self.info
        self.items.append(("layer", LayerSpec(
            name=f"ttt_{name}", factory=learner_cls.make_layer, description=description or _first_line(learner_cls),
            plugin=info.name, distribution=info.distribution, version=info.version,
            config=learner_cls.layer_config(), kind="learner", target=learner_cls,
        )))

    def task(self, name: str, factory: Callable, *, description: str = "") -> None:
        _check_name(name)
        self.items.append(("task", TaskSpec(name=name, factory=factory, plugin=self.info.name,
                                            description=description or _first_line(factory))))

    def converter(self, name: str, function: Callable, *, description: str = "") -> None:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"expected a converter name that is a public Python identifier, got {name!r}")
        if not callable(function):
            raise TypeError(f"register({name!r}, ...): the converter must be callable, got {function!r}")
        self.items.append(("converter", ConverterSpec(name=name, function=function, plugin=self.info.name,
                                                      description=description or _first_line(function))))


class Registry:
    """Holds the plugin manager and what the plugins registered. One process-wide instance."""

    def __init__(self):
        self._lock = threading.RLock()
        self._loaded = False
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(HookSpecs)
        self.layers: dict[str, LayerSpec] = {}
        self.aliases: dict[str, str] = {}
        self.tasks: dict[str, TaskSpec] = {}
        self.converters: dict[str, ConverterSpec] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self._inline: list[tuple[object, str]] = []

    # --- loading ---------------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True

    def reload(self) -> None:
        with self._lock:
            self._reset()
            self._load()
            self._loaded = True

    def _reset(self) -> None:
        inline = self._inline
        self.__init__()
        self._inline = inline

    def _load(self) -> None:
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "",
                version=dist.version if dist is not None else "",
            )
            if ep.name in self.plugins:
                info.error = f"entry point name {ep.name!r} is used by two distributions"
                self.plugins[f"{ep.name} ({info.distribution})"] = info
                continue
            self.plugins[ep.name] = info
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a broken plugin must not take the others down
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}", exc)
                continue
            self._add(module, info)
        for obj, name in self._inline:
            info = PluginInfo(name=name, module=getattr(obj, "__name__", repr(obj)), distribution="(inline)")
            self.plugins[name] = info
            self._add(obj, info)

    def _fail(self, info: PluginInfo, reason: str, exc: BaseException) -> None:
        info.error = reason
        info.traceback = "".join(traceback.format_exception(exc))
        log.warning("seqzoo plugin %r failed to load: %s", info.name, reason)
        if _strict():
            raise RuntimeError(f"seqzoo plugin {info.name!r}: {reason}") from exc

    def _add(self, module: object, info: PluginInfo) -> None:
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # noqa: BLE001
            self._fail(info, f"registration failed: {type(exc).__name__}: {exc}", exc)
            return
        for hook_name in _Stage.HOOKS:
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not module:
                    continue
                # this plugin's registrations are staged; committed only if its hook completes
                stage = _Stage(info)
                try:
                    impl.function(register=getattr(stage, _Stage.HOOKS[hook_name]))
                except Exception as exc:  # noqa: BLE001
                    self._fail(info, f"{hook_name} failed: {type(exc).__name__}: {exc}", exc)
                    continue
                for kind, spec in stage.items:
                    self._commit(kind, spec, info)

    def _commit(self, kind: str, spec, info: PluginInfo) -> None:
        if kind in ("converter", "task"):  # one name each: a second, different object is a conflict
            table, mine = (self.converters, info.converters) if kind == "converter" else (self.tasks, info.tasks)
            target = (lambda sp: sp.function) if kind == "converter" else (lambda sp: sp.factory)
            old = table.get(spec.name)
            if old is not None and target(old) is not target(spec):
                self._conflict(info, kind, spec.name, old.plugin)
                return
            table[spec.name] = spec
            mine.append(spec.name)
            return
        names = (spec.name, *spec.aliases)
        for n in names:
            owner = self.aliases.get(n, n if n in self.layers else None)
            if owner is not None:
                old = self.layers[owner]
                if old.target is not spec.target:
                    self._conflict(info, "layer", n, old.plugin)
                    return
        self.layers[spec.name] = spec
        for a in spec.aliases:
            self.aliases[a] = spec.name
        info.layers.append(spec.name)

    def _conflict(self, info: PluginInfo, what: str, name: str, other: str) -> None:
        msg = f"{what} name {name!r} registered by plugin {other!r} is registered again by plugin {info.name!r} with a different object"
        exc = ValueError(msg)
        self._fail(info, msg, exc)

    # --- queries ------------------------------------------------------------------------------
    def resolve(self, name: str) -> LayerSpec:
        self.ensure_loaded()
        if not isinstance(name, str):
            raise TypeError(f"expected a layer name (str), got {type(name).__name__}")
        key = self.aliases.get(name, name)
        if key not in self.layers:
            known = list(self.layers) + list(self.aliases)
            failed = [p.name for p in self.plugins.values() if p.error]
            extra = f" (plugins that failed to load: {', '.join(failed)}; see `seqzoo plugins`)" if failed else ""
            raise KeyError(f"unknown layer {name!r}{_close(name, known)} Known layers: {', '.join(sorted(self.layers))}{extra}")
        return self.layers[key]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise ValueError(f"expected a name of letters, digits, '_' or '-', got {name!r}")


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


REGISTRY = Registry()


# --- the public functions ---------------------------------------------------------------------------
def list_layers(pattern: str = "*") -> list[str]:
    """Names of the registered layers matching a shell-style ``pattern``, sorted."""
    REGISTRY.ensure_loaded()
    return sorted(n for n in REGISTRY.layers if fnmatch.fnmatchcase(n, pattern))


def layer_spec(name: str) -> LayerSpec:
    """The ``LayerSpec`` of a layer (by name or alias); unknown names get close matches."""
    return REGISTRY.resolve(name)


def validate_config(spec: LayerSpec, config: dict[str, Any]) -> None:
    """Raise ``TypeError`` for config keys the layer does not have (naming close matches) and for
    values whose type does not fit the option's declared type."""
    names = spec.field_names()
    accepts_any = spec.config is None and _has_var_keyword(spec.factory)
    for key in config:
        if key not in names and not accepts_any:
            raise TypeError(
                f"layer {spec.name!r} has no config option {key!r}{_close(key, names)} "
                f"Options: {', '.join(names) or '(none)'}"
            )
    if spec.config is None:
        return
    try:
        hints = typing.get_type_hints(spec.config)
    except Exception:  # noqa: BLE001 - unresolvable annotations: skip the type check
        return
    for key, value in config.items():
        if key in hints and not _fits(value, hints[key]):
            raise TypeError(
                f"layer {spec.name!r}: option {key!r} expects {_type_text(hints[key])}, got {value!r} "
                f"({type(value).__name__})"
            )


def _fits(value: Any, hint: Any) -> bool:
    """A shallow check of ``value`` against a type hint: plain types, unions, Optional, Literal."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _has_var_keyword(factory) -> bool:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False


def create_layer(name: str, d_model: int, **config):
    """Build the layer ``name`` with width ``d_model`` and the given config options."""
    from .contract import SequenceLayer

    spec = layer_spec(name)
    validate_config(spec, config)
    layer = spec.factory(d_model, **config)
    if not isinstance(layer, SequenceLayer):
        raise TypeError(f"the factory of layer {spec.name!r} returned {type(layer).__name__}, not a SequenceLayer")
    return layer


def _names(table: dict, pattern: str) -> list[str]:
    REGISTRY.ensure_loaded()
    return sorted(n for n in table if fnmatch.fnmatchcase(n, pattern))


def _find(kind: str, table: dict, name: str):
    """``table[name]``, or a KeyError with close matches, the known names and the plugins that failed."""
    REGISTRY.ensure_loaded()
    if name not in table:
        failed = [p.name for p in REGISTRY.plugins.values() if p.error]
        extra = f" (plugins that failed to load: {', '.join(failed)}; see `seqzoo plugins`)" if failed else ""
        raise KeyError(f"unknown {kind} {name!r}{_close(name, table)} Known {kind}s: "
                       f"{', '.join(sorted(table)) or '(none)'}{extra}")
    return table[name]


def list_tasks(pattern: str = "*") -> list[str]:
    """Names of the registered harness tasks matching a shell-style ``pattern``, sorted."""
    return _names(REGISTRY.tasks, pattern)


def task_spec(name: str) -> TaskSpec:
    """The ``TaskSpec`` of a registered task; unknown names get close matches."""
    return _find("task", REGISTRY.tasks, name)


def list_converters(pattern: str = "*") -> list[str]:
    """Names of the registered checkpoint converters (``seqzoo.interop.<name>``), sorted."""
    return _names(REGISTRY.converters, pattern)


def converter(name: str) -> ConverterSpec:
    """The ``ConverterSpec`` of a registered converter; unknown names get close matches."""
    return _find("converter", REGISTRY.converters, name)


def list_plugins() -> list[PluginInfo]:
    """Every plugin seen, loaded or failed, with what it registered or why it failed."""
    REGISTRY.ensure_loaded()
    return list(REGISTRY.plugins.values())


def plugin_failures() -> dict[str, str]:
    return {p.name: p.error for p in list_plugins() if p.error}


def register_plugin(obj: object, name: str | None = None) -> PluginInfo:
    """Register a plugin object or module at run time (tests, notebooks); returns its ``PluginInfo``."""
    REGISTRY.ensure_loaded()
    name = name or getattr(obj, "__name__", None) or f"inline-{id(obj):x}"
    with REGISTRY._lock:
        if name in REGISTRY.plugins:
            raise ValueError(f"a plugin named {name!r} is already registered")
        REGISTRY._inline.append((obj, name))
        info = PluginInfo(name=name, module=getattr(obj, "__name__", repr(obj)), distribution="(inline)")
        REGISTRY.plugins[name] = info
        REGISTRY._add(obj, info)
    return info


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with ``register_plugin`` and everything it registered."""
    with REGISTRY._lock:
        REGISTRY._inline = [(o, n) for o, n in REGISTRY._inline if n != name]
        REGISTRY.reload()


def reload_plugins() -> None:
    """Forget everything and load the entry points again (after installing a plugin)."""
    REGISTRY.reload()
