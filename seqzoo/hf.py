"""seqzoo models as Hugging Face transformers models: ``AutoModelForCausalLM``, ``save_pretrained``,
``generate``, and everything built on them (lm-evaluation-harness's ``hf`` model among them).

Importing this module registers ``SeqzooConfig`` (``model_type = "seqzoo"``) with ``AutoConfig`` and
``SeqzooForCausalLM`` with ``AutoModelForCausalLM``, so a saved folder loads with
``AutoModelForCausalLM.from_pretrained(folder)`` and no ``trust_remote_code``::

    import seqzoo.hf
    model = seqzoo.hf.SeqzooForCausalLM(seqzoo.hf.SeqzooConfig(layer="ttt_linear", d_model=64))
    model.save_pretrained("out")            # config.json + model.safetensors
    model = AutoModelForCausalLM.from_pretrained("out")
    model.generate(ids, max_new_tokens=20)  # O(1) per token for a recurrent layer

The model wraps a ``LanguageModel`` (``model.model``) of any registered layer, built-in or from a
plugin, in either backbone. Generation carries seqzoo's state in ``SeqzooCache``, a transformers
``Cache`` holding one block's flat state per layer: the prompt runs through the layers' parallel or
chunked ``forward``, every new token through ``step``, exactly as ``LanguageModel.generate`` does, so
greedy decoding gives the same tokens. Beam search reorders the state along its batch dimension;
padded batches, ``inputs_embeds`` and rolling the cache back (assisted decoding, contrastive search)
raise an error instead of computing something else.

transformers is optional (``pip install "seqzoo[hf]"``); both the 4.x (≥ 4.56) and 5.x APIs work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'seqzoo.hf needs Hugging Face transformers (>= 4.56): pip install "seqzoo[hf]"'
    ) from err

from .backbones import LanguageModel, ModelConfig
from .contract import State
from .registry import layer_spec

__all__ = ["SeqzooConfig", "SeqzooForCausalLM", "SeqzooCache", "MissingLayerPlugin", "TRANSFORMERS_MAJOR"]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: the name under which this transformers version passes a cache to ``forward`` and returns it in
#: the output: ``past_key_values`` in 4.x, ``cache`` from 5.2x on
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_PLUGIN_FIELDS = ("plugin", "plugin_distribution", "plugin_version")


class MissingLayerPlugin(ImportError):
    """A saved model's layer is not registered here: its plugin's distribution is not installed."""


class SeqzooConfig(PretrainedConfig):
    """The configuration of a ``SeqzooForCausalLM``: the fields of ``seqzoo.backbones.ModelConfig``
    (``layer``, ``backbone``, ``vocab_size``, ``d_model``, ``n_layers``, ..., ``layer_config``) plus
    where the layer comes from: the plugin's entry-point name, distribution and version, read off the
    registry when the config is made (a saved config keeps the ones it was saved with)."""

    model_type = "seqzoo"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    def __init__(self, layer: str = "ttt_linear", backbone: str = "transformer", vocab_size: int = 256,
                 d_model: int = 64, n_layers: int = 2, mlp: bool = True, intermediate_size: int | None = None,
                 norm_eps: float = 1e-6, conv_kernel: int = 4, tie_embeddings: bool = True,
                 residual_in_fp32: bool = False, layer_config: dict[str, Any] | None = None,
                 plugin: str | None = None, plugin_distribution: str | None = None,
                 plugin_version: str | None = None, use_cache: bool = True, **kwargs):
        if layer_config is not None and not isinstance(layer_config, dict):
            raise TypeError(f"expected layer_config to be a dict of the layer's options, got {type(layer_config).__name__}")
        self.layer = layer
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.mlp = mlp
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.conv_kernel = conv_kernel
        self.tie_embeddings = tie_embeddings
        self.residual_in_fp32 = residual_in_fp32
        self.layer_config = dict(layer_config or {})
        if plugin is None and plugin_distribution is None:
            plugin, plugin_distribution, plugin_version = _provenance(layer)
        self.plugin = plugin
        self.plugin_distribution = plugin_distribution
        self.plugin_version = plugin_version
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> SeqzooConfig:
        """The transformers config of a ``LanguageModel``'s ``ModelConfig``."""
        return cls(**config.to_dict(), **kwargs)

    def model_config(self) -> ModelConfig:
        """The ``ModelConfig`` that builds this model's ``LanguageModel``."""
        return ModelConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})

    def to_diff_dict(self) -> dict[str, Any]:
        # every field that defines the model is written, default or not: a config.json names its
        # layer, backbone and plugin in full even when they equal this class's defaults
        out = super().to_diff_dict()
        out.update({name: getattr(self, name) for name in (*_MODEL_FIELDS, *_PLUGIN_FIELDS)})
        return out


def _provenance(layer: str) -> tuple[str | None, str | None, str | None]:
    """(plugin, distribution, version) of a registered layer; Nones when it is not registered."""
    try:
        spec = layer_spec(layer)
    except KeyError:
        return None, None, None
    return spec.plugin or None, spec.distribution or None, spec.version or None


def _check_layer_installed(config: SeqzooConfig) -> None:
    try:
        layer_spec(config.layer)
    except KeyError:
        dist = config.plugin_distribution
        if not dist:
            raise MissingLayerPlugin(
                f"this model uses the seqzoo layer {config.layer!r}, which no installed plugin registers "
                "(its config does not name the distribution that provides it); `seqzoo list` shows the "
                "layers installed here"
            ) from None
        pin = f"=={config.plugin_version}" if config.plugin_version else ""
        raise MissingLayerPlugin(
            f"this model uses the seqzoo layer {config.layer!r} from the plugin {config.plugin!r} of the "
            f"distribution {dist!r} (version {config.plugin_version or '?'}), which is not installed here: "
            f"pip install '{dist}{pin}'"
        ) from None


# --- the cache -----------------------------------------------------------------------------------------
class SeqzooLayerCache(CacheLayerMixin):
    """One block's state: its layer's flat state under ``"layer."`` (and the Mamba backbone's
    pre-conv state under ``"preconv"``), every tensor with the batch as its first dimension."""

    is_compileable = False
    is_sliding = False

    def __init__(self, state: State | None = None):
        super().__init__()
        self.state: State | None = state
        self.seen = 0

    def __repr__(self) -> str:
        keys = sorted(self.state) if self.state else []
        return f"SeqzooLayerCache(seen={self.seen}, keys={keys})"

    # a recurrent state has no keys and values to append to
    def lazy_initialization(self, *args, **kwargs):
        raise TypeError("a seqzoo layer keeps its own state; it has no key/value cache to initialise")

    def update(self, *args, **kwargs):
        raise TypeError("a seqzoo layer keeps its own state; it has no key/value cache to update")

    def get_mask_sizes(self, *args, **kwargs):
        raise TypeError("a seqzoo layer builds no attention mask from the cache")

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.state is not None:
            self.state = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.state.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.state.items()}

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state = {k: v[indices] for k, v in self.state.items()}

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a seqzoo state cannot be rolled back to an earlier token (assisted decoding and contrastive "
            "search need that); use greedy, sampling or beam search"
        )


class SeqzooCache(Cache):
    """A transformers ``Cache`` holding a ``SeqzooForCausalLM``'s state: one ``SeqzooLayerCache`` per
    block, and how many tokens of each sequence it has seen. It is made empty (``state is None``) and
    filled by the first forward pass; a recurrent layer's state stays the same size for every token."""

    is_compileable = False

    def __init__(self, n_layers: int):
        layers = [SeqzooLayerCache() for _ in range(n_layers)]
        super().__init__(layers=layers)
        self._decoders: tuple[int, list] | None = None

    def __repr__(self) -> str:
        return f"SeqzooCache(layers={len(self.layers)}, seen={self.get_seq_length()})"

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return self.layers[0].state is not None if self.layers else False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int | None:
        state = self.layers[0].state if self.layers else None
        return next(iter(state.values())).shape[0] if state else None

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.layers[layer_idx or 0].seen if self.layers else 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs):
        raise TypeError("a seqzoo model builds no attention mask from its cache")

    def update(self, *args, **kwargs):
        raise TypeError("a seqzoo layer keeps its own state; it has no key/value cache to update")

    def has_previous_state(self, layer_idx: int | None = None, *args, **kwargs) -> bool:
        return self.is_initialized

    # the whole model's flat state, as LanguageModel takes it
    def model_state(self) -> State | None:
        """The state as ``LanguageModel`` takes it (``"{block}.{key}"``), or None before any token."""
        if not self.is_initialized:
            return None
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.state.items()}

    def store(self, blocks: list[State], new_tokens: int) -> None:
        """Keep each block's new state (``LanguageModel.block_states``) after ``new_tokens`` more tokens."""
        for layer, block in zip(self.layers, blocks, strict=True):
            layer.state = block
            layer.seen += new_tokens

    def decoders(self, model: LanguageModel, batch_size: int) -> list:
        """The model's layer decoders for this batch size, made once per cache."""
        if self._decoders is None or self._decoders[0] != batch_size:
            self._decoders = (batch_size, model.decoders(batch_size))
        return self._decoders[1]

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._decoders = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)


# --- the model -----------------------------------------------------------------------------------------
class SeqzooForCausalLM(PreTrainedModel, GenerationMixin):
    """A seqzoo ``LanguageModel`` (``self.model``) as a transformers causal language model.

    ``forward(input_ids, labels=None, use_cache=None, past_key_values|cache=None)`` returns
    ``CausalLMOutputWithPast``: logits (B, T, vocab), the loss of ``labels`` shifted by one token
    (``-100`` ignored) when given, and a ``SeqzooCache`` with the state after the last token."""

    config_class = SeqzooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def __init__(self, config: SeqzooConfig, *, language_model: LanguageModel | None = None):
        if not isinstance(config, SeqzooConfig):
            raise TypeError(f"expected a SeqzooConfig, got {type(config).__name__}")
        super().__init__(config)
        _check_layer_installed(config)
        self.model = language_model if language_model is not None else LanguageModel(config.model_config())
        self.post_init()

    @classmethod
    def from_language_model(cls, lm: LanguageModel, **config_kwargs) -> SeqzooForCausalLM:
        """Wrap a built ``LanguageModel`` (its parameters are shared, not copied): the model a seqzoo
        checkpoint or an official-checkpoint converter gives, ready for ``save_pretrained``."""
        if not isinstance(lm, LanguageModel):
            raise TypeError(f"expected a seqzoo LanguageModel, got {type(lm).__name__}")
        return cls(SeqzooConfig.from_model_config(lm.config, **config_kwargs), language_model=lm)

    @classmethod
    def get_init_context(cls, *args, **kwargs):
        """transformers 5 builds a model under ``torch.device("meta")`` before loading its weights; a seqzoo
        layer's constructor is any plugin's code, which may compute on tensors (a ``.item()`` in a check),
        so the model is built on the CPU for real, then loaded."""
        return [c for c in super().get_init_context(*args, **kwargs)
                if not (isinstance(c, torch.device) and c.type == "meta")]

    def _init_weights(self, module) -> None:
        """Nothing: every seqzoo layer initialises its own parameters when it is built (its paper's
        initialisation), and ``from_pretrained`` overwrites them all."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        # tied embeddings: the head reads the embedding matrix itself, so there is no second tensor
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a SeqzooCache, made by prepare_inputs_for_generation

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                past_key_values: SeqzooCache | None = None, cache: SeqzooCache | None = None,
                inputs_embeds: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, position_ids: Tensor | None = None,
                cache_position: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        unknown = set(kwargs) - {"num_items_in_batch", "logits_to_keep"}
        if unknown:
            raise TypeError(f"SeqzooForCausalLM.forward got unexpected arguments {sorted(unknown)}")
        if inputs_embeds is not None:
            raise ValueError("SeqzooForCausalLM embeds token ids itself: pass input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("SeqzooForCausalLM returns neither attention maps nor per-block hidden states")
        if input_ids is None:
            raise ValueError("SeqzooForCausalLM.forward needs input_ids of shape (B, T)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "SeqzooForCausalLM does not take padded batches (a recurrent state would read the padding): "
                "pass prompts of equal length with an all-ones attention_mask, or one prompt at a time "
                "(generate makes the mask from pad_token_id when it is given none: a prompt token equal to "
                "pad_token_id reads as padding)"
            )
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("pass the cache once, as cache or as past_key_values")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SeqzooCache):
            raise TypeError(f"expected a SeqzooCache, got {type(cache).__name__}")
        if use_cache is None:  # a training step keeps no state unless asked to
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = SeqzooCache(len(self.model.layers))

        state = cache.model_state() if cache is not None else None
        T = input_ids.shape[-1] if input_ids.ndim == 2 else 0
        seen = cache.get_seq_length() if cache is not None else 0
        for name, given in (("position_ids", position_ids), ("cache_position", cache_position)):
            # the layers count positions in their state: only the positions that follow it are possible
            if given is not None and (given.shape[-1] != T or not bool((given.cpu() == torch.arange(seen, seen + T)).all())):
                raise ValueError(f"SeqzooForCausalLM takes the positions that follow its cache ({seen}..{seen + T - 1})"
                                 f" only; got {name} {given.tolist()}")
        if state is not None and T == 1:  # one token: the update rule, through the layers' decoders
            logits, new_state = self.model.step(
                input_ids[:, 0], state, decoders=cache.decoders(self.model, input_ids.shape[0]))
            logits = logits[:, None]
        else:
            logits, new_state = self.model(input_ids, state)
        if cache is not None:
            cache.store(self.model.block_states(new_state), T)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"expected labels of shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            # the mean over labelled tokens; the Trainer's gradient accumulation passes the count of the
            # whole accumulated batch instead (num_items_in_batch), and the sum is divided by that
            items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / torch.as_tensor(items, device=loss.device, dtype=loss.dtype)
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, int) and keep > 0:
            logits = logits[:, -keep:]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: SeqzooCache | None = None,
                                      cache: SeqzooCache | None = None, attention_mask: Tensor | None = None,
                                      inputs_embeds: Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict[str, Any]:
        """The tokens the cache has not seen yet (the whole prompt first, then one token per step)."""
        if inputs_embeds is not None:
            raise ValueError("SeqzooForCausalLM generates from input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = SeqzooCache(len(self.model.layers))
        seen = cache.get_seq_length() if cache is not None else 0
        if seen > input_ids.shape[1]:
            raise ValueError(f"the cache has seen {seen} tokens but the sequence has {input_ids.shape[1]}")
        new_ids = input_ids[:, seen:] if cache is not None else input_ids
        return {"input_ids": new_ids.contiguous(), _CACHE_FIELD: cache, "attention_mask": attention_mask,
                "use_cache": use_cache}

    #: generate's options that roll a cache back to an earlier token (draft tokens checked, then undone)
    _ROLLBACK_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha", "assistant_early_exit")

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, refusing at once what a recurrent state cannot do: assisted
        decoding (a draft model, prompt lookup, early exit) and contrastive search roll the cache back to
        an earlier token."""
        config = kwargs.get("generation_config")
        asked = [k for k in self._ROLLBACK_OPTIONS
                 if kwargs.get(k) is not None or getattr(config, k, None) is not None]
        if asked:
            raise ValueError(
                f"SeqzooForCausalLM cannot decode with {asked}: they roll the cache back to an earlier token, "
                "which a recurrent state cannot do; use greedy decoding, sampling or beam search"
            )
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``config.json`` + ``model.safetensors`` (always safetensors), and a two-line module
        ``seqzoo_auto.py`` that the config's ``auto_map`` names: it imports the installed seqzoo, so tools
        that never import ``seqzoo.hf`` (the ``lm_eval`` command) load the folder with
        ``trust_remote_code=True`` and run no code but seqzoo's own."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("seqzoo saves models in safetensors only (safe_serialization=False asks for pickle)")
        kwargs.pop("safe_serialization", None)
        self.config.auto_map = {"AutoConfig": f"{_SHIM}.SeqzooConfig",
                                "AutoModelForCausalLM": f"{_SHIM}.SeqzooForCausalLM"}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        if (folder / "config.json").is_file():
            _write_text(folder / f"{_SHIM}.py", _SHIM_TEXT)
        return out

    def _reorder_cache(self, cache: SeqzooCache, beam_idx: Tensor) -> SeqzooCache:
        cache.reorder_cache(beam_idx)
        return cache


_SHIM = "seqzoo_auto"
_SHIM_TEXT = (
    '"""The seqzoo model of this folder, for transformers\' Auto classes: the installed seqzoo\'s own classes."""\n'
    "from seqzoo.hf import SeqzooConfig, SeqzooForCausalLM  # noqa: F401\n"
)


def _write_text(path: Path, text: str) -> None:
    from .bench.store import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def register() -> None:
    """Register ``SeqzooConfig`` and ``SeqzooForCausalLM`` with the transformers Auto classes (done on
    import; repeating it is harmless)."""
    try:
        AutoConfig.register("seqzoo", SeqzooConfig)
    except ValueError:
        pass  # registered already
    try:
        AutoModelForCausalLM.register(SeqzooConfig, SeqzooForCausalLM)
    except ValueError:
        pass


register()


def save_language_model(lm: LanguageModel, folder: str | Path, **config_kwargs) -> Path:
    """Save a ``LanguageModel`` as a transformers folder (``config.json`` + ``model.safetensors``)."""
    SeqzooForCausalLM.from_language_model(lm, **config_kwargs).save_pretrained(str(folder))
    return Path(folder)


# --- the byte tokenizer --------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """A printable character for each byte 0..255 (the byte-level BPE convention): printable Latin-1
    bytes stand for themselves, the rest take the code points from 256 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer():
    """A transformers tokenizer whose token ids are the UTF-8 bytes of the text: the vocabulary of
    seqzoo's ``lm`` task (``--tokenizer bytes``), so lm-evaluation-harness and ``generate`` read and
    write the same ids the model was trained on. Byte 0 (NUL, absent from text) is its end-of-text and
    padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # split_special_tokens: the end-of-text token's text is the character standing for byte 0 (U+0100),
    # which real text may hold; it must encode as its two UTF-8 bytes, never as end-of-text
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], pad_token=chars[0],
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True)


# --- seqzoo train's checkpoints --------------------------------------------------------------------------
def export_checkpoint(run: str | Path, folder: str | Path, *, tokenizer: bool | None = None) -> Path:
    """Write the latest checkpoint of a ``seqzoo train --out RUN`` folder as a transformers folder
    (``config.json``, ``model.safetensors``, and for a text task the tokenizer it was trained with: the
    byte tokenizer, or its Hugging Face tokenizer; ``tokenizer`` True/False forces it on or off). Returns
    the folder."""
    from .bench.store import load_tensors, read_json
    from .bench.tasks import task_info
    from .bench.train import TrainConfig, build_model

    run = Path(run)
    if not (run / "latest.json").is_file():
        raise FileNotFoundError(f"expected a seqzoo train output folder with latest.json, got {str(run)!r}")
    ckpt = run / read_json(run / "latest.json")["checkpoint"]
    trainer = read_json(ckpt / "trainer.json")
    cfg = TrainConfig.from_dict(trainer["config"])
    state, _ = load_tensors(ckpt / "model.safetensors")
    vocab = state["embed_tokens.weight"].shape[0]
    lm = build_model(cfg, vocab)
    lm.load_state_dict(state, strict=True)
    folder = Path(folder)
    save_language_model(lm, folder, seqzoo_train={"task": cfg.task, "task_config": cfg.task_config,
                                                   "step": int(trainer["step"]), "seed": cfg.seed})
    option = task_info(cfg.task)["tokenizer_option"]  # the task reads text: (its option, the default)
    trained_with = cfg.task_config.get(*option) if option else None
    if tokenizer is None:
        tokenizer = trained_with is not None
    if tokenizer:
        if trained_with not in (None, "bytes"):  # the Hugging Face tokenizer the run read its text with
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(trained_with).save_pretrained(str(folder))
        else:
            byte_tokenizer().save_pretrained(str(folder))
    return folder
