"""HorizonLM and the transformer baseline as ``transformers`` (v5) models (extra ``[hf]``).

Importing this module registers ``horizonlm`` and ``horizonlm-transformer`` with ``AutoConfig``
and ``AutoModelForCausalLM``, so a folder from ``horizon export`` (or ``save_pretrained``) loads
with ``AutoModelForCausalLM.from_pretrained(DIR)`` and its tokenizer with
``AutoTokenizer.from_pretrained(DIR)``.

The config classes are generated from the model's own config dataclass: their fields are exactly
its fields, so a field added to or renamed in :class:`horizonlm.HorizonConfig` needs no edit here.
The model classes wrap the unchanged model as ``self.model``.

``.generate()`` carries the model's state as its cache (:class:`RecurrentCache`): HorizonLM's is
a fixed size whatever the length, the baseline's is its growing key/value cache. The prompt is
fed in windows of ``prefill_window`` tokens with the state carried, as ``horizon generate`` does,
so greedy decoding gives exactly its tokens. Padded batches are refused (see ``padding_error``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from horizonlm.baseline import TransformerLM
from horizonlm.config import ADDED_FIELDS, HorizonConfig, TransformerConfig
from horizonlm.integrations.export import MODEL_TYPES
from horizonlm.model import HorizonLM
from horizonlm.state import HorizonState, KVState, MemoryState


class _ModelConfigMixin:
    """What the generated config classes share: the model's own config, rebuilt from the fields."""

    model_config_class: ClassVar[type]

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.model_config()  # an invalid value fails here, with the model's own message

    def model_config(self) -> HorizonConfig | TransformerConfig:
        names = [f.name for f in dataclasses.fields(self.model_config_class)]
        return self.model_config_class.from_dict({n: getattr(self, n) for n in names})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Refuse another model's config (transformers only warns, then builds a broken model); a
        config saved before a field was added loads as the model it was (``ADDED_FIELDS``)."""
        found = config_dict.get("model_type", cls.model_type)
        if found != cls.model_type:
            raise ValueError(f"config.json is for a model of type {found!r}; {cls.__name__} needs {cls.model_type!r}")
        added = ADDED_FIELDS if cls.model_config_class is HorizonConfig else {}
        return super().from_dict({**added, **config_dict}, **kwargs)


def _config_class(name: str, model_type: str, model_config_class: type, attribute_map: dict[str, str]) -> type:
    """A ``PreTrainedConfig`` subclass whose fields and defaults are those of ``model_config_class``."""
    fields = dataclasses.fields(model_config_class)
    clash = sorted(f.name for f in fields if hasattr(PreTrainedConfig, f.name))
    if clash:
        raise TypeError(f"{model_config_class.__name__} fields {clash} clash with PreTrainedConfig attributes")
    hints = typing.get_type_hints(model_config_class)
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"The fields of :class:`{model_config_class.__name__}` as a transformers config.",
        "__annotations__": {f.name: hints[f.name] for f in fields},
        "model_type": model_type,
        "model_config_class": model_config_class,
        "attribute_map": attribute_map,
    }
    for f in fields:
        namespace[f.name] = f.default if f.default is not dataclasses.MISSING else dataclasses.field(
            default_factory=f.default_factory)
    return type(name, (_ModelConfigMixin, PreTrainedConfig), namespace)


_COMMON_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "tie_word_embeddings": "tie_embeddings"}
HorizonLMConfig = _config_class("HorizonLMConfig", MODEL_TYPES["horizon"], HorizonConfig, _COMMON_NAMES)
HorizonTransformerConfig = _config_class("HorizonTransformerConfig", MODEL_TYPES["transformer"], TransformerConfig,
                                         {**_COMMON_NAMES, "num_attention_heads": "n_heads"})


def _state_tensors(state: HorizonState | KVState) -> list[Tensor]:
    if isinstance(state, KVState):
        return [*state.keys, *state.values]
    found: list[Tensor] = []
    state.map_tensors(lambda t: found.append(t) or t)
    return found


def _select_rows(state: HorizonState | KVState, index: Tensor) -> HorizonState | KVState:
    """The streams ``index`` of a batched state, in that order (beam search reorders its beams)."""
    if isinstance(state, KVState):
        return replace(state, keys=tuple(k.index_select(0, index) for k in state.keys),
                       values=tuple(v.index_select(0, index) for v in state.values), batch_size=len(index))
    out = state.map_tensors(lambda t: t.index_select(0, index.to(t.device)))
    if isinstance(state.memory, MemoryState):  # its chunk ids are one row shared by the batch
        out = replace(out, memory=replace(out.memory, chunk_ids=state.memory.chunk_ids))
    return replace(out, batch_size=len(index))


class RecurrentCache:
    """The model's state as the cache of ``generate`` and ``forward``.

    Updated in place, as every transformers cache is; the states it holds are the model's own,
    immutable ones, so a ``cache.state`` taken at any point stays valid (branch a stream with it).
    It is not a ``transformers.Cache``: those are lists of per-layer key/value tensors, while
    HorizonLM's state also holds the supervisor, its chunk clock and the memory.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: HorizonState | KVState) -> None:
        self.state = state

    @property
    def is_linear(self) -> list[bool]:
        """Tells ``generate`` not to slice the prompt itself: :meth:`prepare_inputs_for_generation` does."""
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens of the stream this cache has read."""
        return self.state.pos

    def nbytes(self) -> int:
        """Bytes of every tensor of the state: constant for HorizonLM, growing for the baseline."""
        return sum(t.numel() * t.element_size() for t in _state_tensors(self.state))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.state = _select_rows(self.state, beam_idx)


class _CausalLM(PreTrainedModel, GenerationMixin):
    """``forward`` and ``generate`` around a model with the ``model(tokens, state)`` contract."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    model_class: ClassVar[type[nn.Module]]
    padding_error: ClassVar[str]
    prefill_window: int = 4096
    """Tokens fed per call, the state carried between calls (``horizon generate --window``)."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config.model_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the wrapped model initialises itself (transformers' generic init would not match)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: the model's own state is the cache (``forward`` makes a :class:`RecurrentCache`)."""
        return False

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """As transformers', but weights that do not fit the config are an error, not a warning
        followed by a model with uninitialised weights."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(bad.values()):
            raise ValueError(f"weights in {args[0] if args else kwargs.get('pretrained_model_name_or_path')} do not "
                             f"fit the config: {bad}")
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: RecurrentCache | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, return_dict: bool | None = None,
                inputs_embeds: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None) -> CausalLMOutputWithPast | tuple:
        """Next-token logits after ``cache`` (a new stream without one); ``labels`` give the mean
        shifted cross-entropy, -100 ignored. Attentions and hidden states are not returned."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__} takes input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(self.padding_error)
        use_cache = use_cache if use_cache is not None else not self.training
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        state = None if cache is None else cache.state
        pieces = []
        for start in range(0, input_ids.shape[1], self.prefill_window):
            logits, state = self.model(input_ids[:, start : start + self.prefill_window], state)  # (B, W, V)
            pieces.append(logits[:, -keep:] if keep else logits)
        logits = torch.cat(pieces, dim=1)  # (B, L, V), or fewer positions with logits_to_keep
        logits = logits[:, -keep:] if keep else logits  # (B, K, V)
        if isinstance(logits_to_keep, Tensor):
            logits = logits[:, logits_to_keep]  # (B, K, V)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                   ignore_index=-100)
        if use_cache:
            if cache is None:
                cache = RecurrentCache(state)
            else:
                cache.state = state
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: RecurrentCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = None,
                                      inputs_embeds: Tensor | None = None, logits_to_keep: int | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Only the tokens the cache has not read: ``generate`` passes the whole sequence each step
        (a cache given to ``generate`` covers the start of ``input_ids``, as in transformers)."""
        if cache is not None:
            seen = cache.get_seq_length()
            if input_ids.shape[1] <= seen:
                raise ValueError(f"the cache has read {seen} tokens; input_ids must be the whole sequence, longer "
                                 f"than that, got {input_ids.shape[1]}")
            input_ids = input_ids[:, seen:]
        inputs = {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache,
                  "inputs_embeds": inputs_embeds}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


class HorizonLMForCausalLM(_CausalLM):
    """:class:`horizonlm.HorizonLM` for ``transformers``: ``from_pretrained``, ``save_pretrained``,
    ``generate`` with the recurrent state as the cache."""

    config_class = HorizonLMConfig
    model_class = HorizonLM
    padding_error = ("HorizonLM cannot take a padded batch (attention_mask with zeros): its recurrent state (S4D "
                     "states, convolution buffers, the supervisor and its chunk clock, the memory) reads every token, "
                     "pad tokens included, and the chunk clock is shared by the batch, so a left-padded row would be "
                     "another stream. Generate prompts of unequal length one at a time, or batch equal lengths.")


class HorizonTransformerForCausalLM(_CausalLM):
    """The transformer baseline through the same API, for side-by-side comparisons."""

    config_class = HorizonTransformerConfig
    model_class = TransformerLM
    padding_error = ("the transformer baseline cannot take a padded batch (attention_mask with zeros): its attention "
                     "has no padding mask and its rotary positions count from the first token of each row. Generate "
                     "prompts of unequal length one at a time, or batch equal lengths.")


AutoConfig.register(MODEL_TYPES["horizon"], HorizonLMConfig, exist_ok=True)
AutoConfig.register(MODEL_TYPES["transformer"], HorizonTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(HorizonLMConfig, HorizonLMForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(HorizonTransformerConfig, HorizonTransformerForCausalLM, exist_ok=True)
