"""Typed, validated model configurations and their presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def require_field(condition: bool, name: str, message: str, value: Any) -> None:
    """The one check of a config field: a ValueError that names the field and its value."""
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


class DictConfig:
    """What every model config dataclass shares: a plain dict for checkpoints, and back from one,
    refusing unknown fields by name (a checkpoint of another model, a misspelt override)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def unknown_fields(cls, values: dict[str, Any]) -> list[str]:
        return sorted(set(values) - {f.name for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        unknown = cls.unknown_fields(values)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**values)


SSM_KINDS = ("s4d", "selective")
SSM_GATES = ("silu", "none")
MEMORY_KINDS = ("induction", "chunk")
# Fields of earlier memory designs (retired by measurement, see docs/RESULTS.md section 1.1): a
# checkpoint that has them was made with another memory and its weights do not fit this one.
RETIRED_FIELDS = ("memory_write", "memory_tie_query", "memory_before_supervisor")
# Fields added after models were first saved, with the value every model saved before them has: a
# checkpoint without the field loads as the model it was, not as today's default.
ADDED_FIELDS: dict[str, Any] = {"memory_late_read": False, "memory_tau_growth": False}


@dataclass
class HorizonConfig(DictConfig):
    """Shape and switches of a :class:`horizonlm.HorizonLM`. Field names follow DESIGN.md."""

    vocab_size: int = 256
    """V: tokens in the vocabulary (256 for bytes)."""
    d_model: int = 256
    """D: width of the residual stream."""
    n_layers: int = 4
    """Number of blocks (S4D + multi-resolution conv + GLU MLP each)."""
    mlp_hidden: int = 704
    """Hidden width of the GLU MLP in each block."""
    ssm_kind: str = "s4d"
    """Sequence mixer of the SSM sublayer: ``s4d`` (time-invariant diagonal S4D, DESIGN.md part 1)
    or ``selective`` (input-dependent step size, B and C per token, as in S6/SSD)."""
    ssm_gate: str = "silu"
    """Output gate of the SSM sublayer: ``silu`` gives ``W_o(GELU(SSM(W_u x)) * SiLU(W_g x))``,
    ``none`` the ungated ``W_o(GELU(SSM(W_u x)))`` (kept for the ablation; give it
    ``mlp_hidden`` + d_model/3 to match parameters)."""
    ssm_state: int = 64
    """N: state size per channel. For ``s4d``, complex, stored as N/2 conjugate pairs (must be
    even); for ``selective``, real, per head."""
    ssm_head_dim: int = 64
    """P: channels per head of the ``selective`` SSM (heads share their step size and B, C);
    must divide d_model. Unused by ``s4d``."""
    ssm_chunk: int = 128
    """T: tokens per chunk of the parallel scan: inside a chunk a (T, T) matrix product, chunk
    boundary states chained by the recurrence. A multiple of 8, at most 1024."""
    ssm_recompute: bool = False
    """Recompute the SSM scan in the backward pass instead of storing its chunk intermediates
    (about the layer's input again in memory). Off by default: on the H200 the base step is 3%
    faster without it (0.502 vs 0.516 s at 16 x 8192) for 6 GB more."""
    ssm_dt_min: float = 1e-3
    """Lower bound of the log-uniform initialisation of the S4D step size dt."""
    ssm_dt_max: float = 1e-1
    """Upper bound of the log-uniform initialisation of the S4D step size dt."""
    conv_kernel: int = 3
    """k: kernel size of every dilated convolution (3 or 4)."""
    conv_levels: int = 4
    """R: number of resolutions; dilations are 1, 2, ..., 2**(R-1)."""
    chunk_size: int = 64
    """C: tokens per chunk for the supervisor and the memory, counted from the stream start."""
    supervisor_dim: int = 256
    """Width of the GRU state s_c of the recurrent supervisor."""
    memory_dim: int = 64
    """Width of the memory keys, queries and values."""
    memory_topk: int = 8
    """K: entries read per token."""
    memory_capacity: int = 4096
    """M: completed chunks whose entries the memory holds before FIFO eviction (one entry each for
    the ``chunk`` memory; C per chunk for the ``induction`` memory, plus the current chunk's so far).
    Training reads every visible entry for every token, so the presets keep it small (8K tokens at
    the base preset); ``horizon passkey --memory-capacity`` raises it for asking (weights do not
    depend on it)."""
    memory_kind: str = "induction"
    """``induction`` (the default, DESIGN.md part 4): every token t writes an entry whose key names
    the n tokens before it and whose value comes from t; queries go through the same W_k, so a
    context seen before meets what followed it at any distance; it reads before block
    ``memory_layer``, with a learned null entry so an empty or unmatched read is zero.
    ``chunk`` is the paper's literal memory (the ablation): one entry per completed chunk, keyed by
    its last token's hidden state, with its own W_q, read where the supervisor sits."""
    memory_key_span: int = 16
    """n: tokens of the memory's input that its keys and queries see, mixed by a learned causal
    depthwise filter: a query sees tokens t-n+1..t, an induction key t-n..t-1. A few bytes name a
    place in prose (one byte cannot: the byte before a passkey's first digit is a space). Values
    always come from token t."""
    memory_layer: int = 0
    """Blocks before the induction memory reads. 0 keys entries and queries by the token
    embeddings alone (an n-gram lookup: a repeated context scores exactly 1); a later layer keys
    them by the hidden state there, which also carries what the n tokens lack (a label a clause
    back). The ``chunk`` memory reads at ``global_layer``, so it must stay 0 there."""
    memory_late_read: bool | None = None
    """Add what the induction memory added to the residual stream a second time, just before the
    final norm, through a gate of its own and a projection that starts at zero
    (:class:`horizonlm.layers.memory.LateRead`): a read made at the token embeddings otherwise
    reaches the logits only through every block. None (the default) means on wherever there is an
    induction memory, off without memory or with the chunk memory. On one H200 under the protocol
    h200-8min it answered passkeys at 128K and 1M tokens that the model without it did not, at
    equal quality (RESULTS.md 1.3d); ``horizon_no_late_read`` is the ablation."""
    memory_tau: float = 10.0
    """tau: inverse temperature of the softmax over the top-K scores (keys are unit vectors)."""
    memory_tau_growth: bool | None = None
    """Grow the induction memory's tau with the entries a token sees, ``tau_t = tau (1 + a log n_t)``,
    ``a`` learned from 0 (:func:`horizonlm.ops.memory_read.count_tau`): a memory asked far larger
    than in training otherwise blurs its read with near-matches. None (the default) means on
    wherever there is an induction memory. On one H200 under the protocol h200-8min it answered 8
    of 12 passkeys at 1M tokens (top 8) where the model without it answered 1, at equal quality on
    prose, with no measurable cost in a training step (RESULTS.md 1.3e, 3.1); ``horizon_no_tau_growth``
    is the ablation."""
    memory_query_block: int = 1024
    """Queries searched at once; bounds the score matrix at B*block*M."""
    count_lengths: tuple[int, ...] = ()
    """Context lengths of the count cache, ascending (empty: none, the default). With it, the output
    is the model's distribution mixed with what followed the longest of these contexts earlier in
    the stream, counted exactly (:class:`horizonlm.layers.count_cache.CountCache`, ops/count_cache.py)."""
    count_capacity: int = 1 << 21
    """Stream positions per block of the count cache: a token counts the contexts of its own block
    and the previous one (so 1x to 2x this far back), which bounds the state at two blocks'
    entries per length (16 bytes each). The weights do not depend on it."""
    global_layer: int | None = None
    """Blocks before the supervisor (and the ``chunk`` memory); None means the middle (n_layers // 2)."""
    use_ssm: bool = True
    """Switch for the S4D sublayer of every block."""
    use_conv: bool = True
    """Switch for the multi-resolution convolution sublayer of every block."""
    use_supervisor: bool = True
    """Switch for the recurrent supervisor."""
    use_memory: bool = True
    """Switch for the retrieval memory."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of linear and embedding weights at initialisation."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "d_model", "n_layers", "mlp_hidden", "ssm_state", "ssm_head_dim", "ssm_chunk",
            "conv_kernel", "conv_levels", "chunk_size", "supervisor_dim", "memory_dim",
            "memory_topk", "memory_capacity", "memory_query_block", "memory_key_span", "count_capacity",
        ):
            value = getattr(self, name)
            require_field(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     "must be a positive integer", value)
        if isinstance(self.count_lengths, list):  # from a JSON checkpoint or a YAML override
            self.count_lengths = tuple(self.count_lengths)
        require_field(isinstance(self.count_lengths, tuple)
                      and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64 for n in self.count_lengths)
                      and list(self.count_lengths) == sorted(set(self.count_lengths)), "count_lengths",
                      "must be ascending distinct integers in [1, 64]", self.count_lengths)
        require_field(not self.count_lengths or self.vocab_size <= 1 << 20, "vocab_size",
                      "must be at most 2**20 with a count cache (its hashed keys share int64 with the token)",
                      self.vocab_size)
        require_field(self.ssm_kind in SSM_KINDS, "ssm_kind", f"must be one of {SSM_KINDS}", self.ssm_kind)
        require_field(self.ssm_gate in SSM_GATES, "ssm_gate", f"must be one of {SSM_GATES}", self.ssm_gate)
        require_field(self.memory_kind in MEMORY_KINDS, "memory_kind", f"must be one of {MEMORY_KINDS}",
                 self.memory_kind)
        if self.ssm_kind == "s4d":
            require_field(self.ssm_state % 2 == 0, "ssm_state", "must be even for s4d (conjugate pairs)", self.ssm_state)
        else:
            require_field(self.d_model % self.ssm_head_dim == 0, "ssm_head_dim", f"must divide d_model={self.d_model}",
                     self.ssm_head_dim)
        require_field(self.ssm_chunk % 8 == 0 and self.ssm_chunk <= 1024, "ssm_chunk",
                 "must be a multiple of 8 and at most 1024", self.ssm_chunk)
        require_field(0 < self.ssm_dt_min <= self.ssm_dt_max, "ssm_dt_min", "must be in (0, ssm_dt_max]", self.ssm_dt_min)
        require_field(self.memory_topk <= self.memory_capacity, "memory_topk",
                 f"must not exceed memory_capacity={self.memory_capacity}", self.memory_topk)
        require_field(self.memory_tau > 0, "memory_tau", "must be positive", self.memory_tau)
        require_field(self.norm_eps > 0, "norm_eps", "must be positive", self.norm_eps)
        require_field(self.init_std > 0, "init_std", "must be positive", self.init_std)
        if self.global_layer is not None:
            require_field(isinstance(self.global_layer, int) and 0 <= self.global_layer <= self.n_layers,
                     "global_layer", f"must be in [0, n_layers={self.n_layers}]", self.global_layer)
        require_field(isinstance(self.memory_layer, int) and not isinstance(self.memory_layer, bool)
                 and 0 <= self.memory_layer < self.n_layers, "memory_layer",
                 f"must be in [0, n_layers={self.n_layers})", self.memory_layer)
        require_field(self.memory_kind == "induction" or self.memory_layer == 0, "memory_layer",
                 "must be 0 for the chunk memory, which reads at global_layer", self.memory_layer)
        for name in ("memory_tau_growth", "memory_late_read"):  # parts of the induction memory
            value = getattr(self, name)
            require_field(value is None or isinstance(value, bool), name, "must be a bool or None", value)
            require_field(not value or self.has_induction_memory, name,
                     "needs the induction memory (use_memory, memory_kind='induction')", value)

    @property
    def has_induction_memory(self) -> bool:
        """Whether the model reads the induction memory (the parts that default to None follow it)."""
        return self.use_memory and self.memory_kind == "induction"

    @property
    def has_late_read(self) -> bool:
        """Whether the model has the late read (``memory_late_read``; None: wherever the induction
        memory is, so switching the memory off or to the chunk design needs no second override)."""
        return self.has_induction_memory if self.memory_late_read is None else self.memory_late_read

    @property
    def has_tau_growth(self) -> bool:
        """Whether the read's tau grows with the entries seen (``memory_tau_growth``; None: wherever
        the induction memory is)."""
        return self.has_induction_memory if self.memory_tau_growth is None else self.memory_tau_growth

    @property
    def global_at(self) -> int:
        """Index of the block before which the supervisor and memory run."""
        return self.n_layers // 2 if self.global_layer is None else self.global_layer

    def to_dict(self) -> dict[str, Any]:
        """As stored in JSON, so that a saved config reads back equal (the lengths as a list)."""
        return {**super().to_dict(), "count_lengths": list(self.count_lengths)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HorizonConfig:
        unknown = cls.unknown_fields(values)
        if "ssm_fft_chunk" in unknown:
            raise ValueError("this model was made by an earlier HorizonLM (ungated FFT S4D block, field "
                             "ssm_fft_chunk); its weights do not fit the current gated SSM sublayer: retrain it")
        retired = sorted(set(unknown) & set(RETIRED_FIELDS))
        if retired:
            raise ValueError(f"this model was made by an earlier HorizonLM whose memory had the settings "
                             f"{', '.join(retired)}; the memory is now one induction design (memory_kind): retrain it")
        return super().from_dict({**ADDED_FIELDS, **values})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> HorizonConfig:
        if name not in HORIZON_PRESETS:
            raise ValueError(f"preset must be one of {sorted(HORIZON_PRESETS)}, got {name!r}")
        return cls(**{**HORIZON_PRESETS[name], **overrides})


# The gated SSM sublayer has two (D, D) matrices more than the original ungated S4D block (its
# input projection W_u and gate W_g); the presets narrow the GLU MLP (3*D*hidden weights) by
# about 2D/3 to pay for them, so a preset keeps the parameter count of the original block.
HORIZON_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_layers=2, mlp_hidden=43, ssm_state=8, ssm_head_dim=8, ssm_chunk=8, conv_levels=3,
                 chunk_size=8, supervisor_dim=16, memory_dim=8, memory_topk=4, memory_capacity=6, memory_key_span=3),
    "cpu": dict(d_model=128, n_layers=3, mlp_hidden=299, ssm_state=16, ssm_head_dim=32, ssm_chunk=64, chunk_size=64,
                supervisor_dim=128, memory_dim=32, memory_topk=8, memory_capacity=64),
    "small": dict(d_model=256, n_layers=4, mlp_hidden=533, ssm_state=32, chunk_size=64,
                  supervisor_dim=256, memory_dim=64, memory_topk=8, memory_capacity=64),
    "base": dict(d_model=768, n_layers=16, mlp_hidden=1536, ssm_state=64,
                 chunk_size=128, supervisor_dim=768, memory_dim=128, memory_topk=8, memory_capacity=64,
                 memory_query_block=4096),
}


@dataclass
class TransformerConfig(DictConfig):
    """Shape of the :class:`horizonlm.TransformerLM` baseline (same embedding, norms and MLP)."""

    vocab_size: int = 256
    """V: tokens in the vocabulary."""
    d_model: int = 256
    """D: width of the residual stream."""
    n_layers: int = 4
    """Number of attention + GLU MLP blocks."""
    n_heads: int = 4
    """Attention heads; d_model must divide evenly."""
    mlp_hidden: int = 704
    """Hidden width of the GLU MLP."""
    rope_base: float = 10000.0
    """Base of the rotary position frequencies."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of linear and embedding weights at initialisation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden"):
            value = getattr(self, name)
            require_field(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     "must be a positive integer", value)
        require_field(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}", self.n_heads)
        require_field((self.d_model // self.n_heads) % 2 == 0, "n_heads", "must leave an even head width for rotary",
                 self.n_heads)
        require_field(self.rope_base > 1, "rope_base", "must exceed 1", self.rope_base)

    @classmethod
    def matching(cls, horizon: HorizonConfig, head_dim: int = 64) -> TransformerConfig:
        """The baseline with the same width, depth, MLP and vocabulary as ``horizon``."""
        n_heads = max(1, horizon.d_model // head_dim)
        return cls(vocab_size=horizon.vocab_size, d_model=horizon.d_model, n_layers=horizon.n_layers,
                   n_heads=n_heads, mlp_hidden=horizon.mlp_hidden, tie_embeddings=horizon.tie_embeddings,
                   norm_eps=horizon.norm_eps, init_std=horizon.init_std)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The baseline of a HorizonLM preset: same width, depth and vocabulary, and the MLP of
        :data:`TRANSFORMER_MLP_HIDDEN`, so it never has fewer parameters than HorizonLM."""
        base = cls.matching(HorizonConfig.preset(name))  # refuses a name that is not a preset
        return cls(**{**base.to_dict(), "mlp_hidden": TRANSFORMER_MLP_HIDDEN[name], **overrides})


TRANSFORMER_MLP_HIDDEN = {"tiny": 96, "cpu": 512, "small": 848, "base": 2048}
"""GLU MLP width of the transformer per preset, so that it has at least the default HorizonLM's
parameters (tested at every preset). Base keeps the width HorizonLM's MLP had before the gated SSM
sublayer took 2D^2 of its weights per block (113.5M against 103.8M); the smaller presets are the
narrowest multiple of 16 that reaches HorizonLM (until 5 December 2026 they had that pre-gate
width too, which left them 14-17% short: 28.8K, 673K and 3.28M against 34.7K, 807K and 3.68M)."""


__all__ = ["HorizonConfig", "TransformerConfig", "TRANSFORMER_MLP_HIDDEN", "HORIZON_PRESETS", "SSM_KINDS", "SSM_GATES", "MEMORY_KINDS"]
