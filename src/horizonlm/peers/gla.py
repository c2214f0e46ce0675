"""flash-linear-attention's Gated Linear Attention (GLA, Yang et al. 2024, arXiv 2312.06635) as
a peer of HorizonLM: model kind ``gla``, extra ``[peers]``.

Why GLA among fla 0.6's recurrent models: it is one of the three the issue names (Mamba-2, Gated
DeltaNet, GLA) and the only one of them fla 0.6 trains on Hopper with Triton 3.6 through its own
kernels. Gated DeltaNet's backward (like every backward through
``fla/ops/common/chunk_o.py:chunk_bwd_dqkwg`` with a gate ``g``: Gated DeltaNet, Simple GLA with a
data-dependent gate, Comba) raises "Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect
results for gated chunk_bwd_dqkwg (see #640)"; fla's Mamba-2 layer runs fast only with the
``mamba_ssm`` CUDA kernels, which are not in fla. GLA's chunked kernels (``fla/ops/gla/chunk.py``)
are its own and, on Hopper with Triton 3.6 to 3.8, drop the one autotune configuration that Triton
miscompiles (triton-lang/triton#11366), rather than refusing. Unlike the ungated DeltaNet (also
allowed), it forgets, through a learned data-dependent decay, which a long stream of novels needs.

The model is the transformer baseline's (embedding, pre-norm RMSNorms, GLU MLP, tied head) with
fla's ``GatedLinearAttention`` layer in place of softmax attention, as the GLA paper compares it
with its Transformer++; the initialisation is fla's own (normal 0.02 weights, zero biases). Its
state is each layer's recurrent matrix, fixed in size: by default the harness carries it from one
window to the next as it does HorizonLM's (``carry_state``).

fla is imported only when a peer is built or checked; fla's kernels are Triton GPU kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.config import DictConfig, HorizonConfig, require_field
from horizonlm.errors import HorizonError
from horizonlm.layers.mlp import GLUMLP
from horizonlm.model import check_tokens, init_weights

GLA_MLP_HIDDEN = {"tiny": 96, "cpu": 496, "small": 832, "base": 1792}
"""GLU MLP width per preset: the narrowest multiple of 16 that gives the peer at least the default
HorizonLM's parameters at that preset (base: 104.34M against 103.80M; tested at every preset
through :meth:`GLAPeerConfig.num_parameters`). Until 5 December 2026 the widths were sized against
the chunk-memory default of then (base 1,760: 103.16M, 0.6% short of today's default)."""

CHANNELS_PER_HEAD = 256
"""Model width per GLA head in the presets: at widths that are multiples of 256, keys 128 and
values 256 wide per head, the head shape of fla's GLA-340M configuration (width 1024, 4 heads)."""


def _fla(module: str) -> ModuleType:
    """A module of flash-linear-attention, imported when a peer is built, never before."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise HorizonError(f"the gla peer needs flash-linear-attention 0.6, which is not importable here ({err}); "
                           "install it with: pip install 'horizonlm[peers]'") from err


def gla_heads(d_model: int) -> int:
    """Heads for a model ``d_model`` wide: one per :data:`CHANNELS_PER_HEAD`, at least one."""
    return max(1, d_model // CHANNELS_PER_HEAD)


@dataclass
class GLAPeerConfig(DictConfig):
    """Shape of the :class:`GLAPeerLM` peer: the transformer baseline's embedding, norms, MLP and
    head around fla's GLA layer."""

    vocab_size: int = 256
    """V: tokens in the vocabulary (256 for bytes)."""
    d_model: int = 256
    """D: width of the residual stream."""
    n_layers: int = 4
    """Number of GLA + GLU MLP blocks."""
    n_heads: int = 1
    """GLA heads; each holds a (D*expand_v/H, D*expand_k/H) state matrix."""
    expand_k: float = 0.5
    """Key (and query, and gate) width as a fraction of D (fla's default)."""
    expand_v: float = 1.0
    """Value (and output gate) width as a fraction of D (fla's default)."""
    gate_low_rank_dim: int = 16
    """Rank of the projection that makes the forget gate from the input (fla's default)."""
    mlp_hidden: int = 704
    """Hidden width of the GLU MLP."""
    carry_state: bool = True
    """Carry the recurrent state from one window to the next in training and scoring, as HorizonLM
    does (False: every window starts from a zero state, as the transformer's does, and as fla's
    own training of GLA on fixed-length sequences)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (the GLA layer's own output norm too)."""
    init_std: float = 0.02
    """Standard deviation of linear and embedding weights at initialisation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "gate_low_rank_dim", "mlp_hidden"):
            value = getattr(self, name)
            require_field(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     "must be a positive integer", value)
        for name in ("expand_k", "expand_v"):
            value = getattr(self, name)
            require_field(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
                     "must be a positive number", value)
            width = self.d_model * value
            require_field(width == round(width), name, f"must make d_model * {name} (d_model={self.d_model}) a whole "
                     "number of channels", value)
            require_field(round(width) % self.n_heads == 0, "n_heads",
                     f"must divide d_model * {name} = {round(width)}", self.n_heads)
        require_field(isinstance(self.carry_state, bool), "carry_state", "must be true or false", self.carry_state)
        require_field(self.norm_eps > 0, "norm_eps", "must be positive", self.norm_eps)
        require_field(self.init_std > 0, "init_std", "must be positive", self.init_std)

    @property
    def key_dim(self) -> int:
        """Keys, queries and forget gates over all heads."""
        return round(self.d_model * self.expand_k)

    @property
    def value_dim(self) -> int:
        """Values and output gates over all heads."""
        return round(self.d_model * self.expand_v)

    def num_parameters(self) -> int:
        """Parameters of :class:`GLAPeerLM` with this shape, counted without fla (which builds
        the layer): per block two RMSNorms (2D), fla's GLA layer (q, k: D x K; v, output gate:
        D x V; forget gate D x r + r x K + K; output V x D; a per-head norm of V/H) and the GLU MLP
        (3 D M); the embedding (tied head unless ``tie_embeddings`` is off) and the final norm."""
        d, k, v, r = self.d_model, self.key_dim, self.value_dim, self.gate_low_rank_dim
        gla = 2 * d * k + 2 * d * v + d * r + r * k + k + v * d + v // self.n_heads
        block = 2 * d + gla + 3 * d * self.mlp_hidden
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * block + d

    @classmethod
    def matching(cls, horizon: HorizonConfig) -> GLAPeerConfig:
        """The peer with the same width, depth, MLP and vocabulary as ``horizon`` (as
        ``TransformerConfig.matching``; the recall bench's models at each width)."""
        return cls(vocab_size=horizon.vocab_size, d_model=horizon.d_model, n_layers=horizon.n_layers,
                   n_heads=gla_heads(horizon.d_model), mlp_hidden=horizon.mlp_hidden,
                   tie_embeddings=horizon.tie_embeddings, norm_eps=horizon.norm_eps, init_std=horizon.init_std)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GLAPeerConfig:
        """The peer of a HorizonLM preset: same width, depth and vocabulary, and the MLP of
        :data:`GLA_MLP_HIDDEN`, so it never has fewer parameters than HorizonLM."""
        base = cls.matching(HorizonConfig.preset(name))  # refuses a name that is not a preset
        return cls(**{**base.to_dict(), "mlp_hidden": GLA_MLP_HIDDEN[name], **overrides})


@dataclass(frozen=True)
class GLAState:
    """What the GLA peer carries from one call to the next: each layer's recurrent matrix, the same
    size at any length. Immutable, as every state of the ``(logits, state)`` contract."""

    layers: tuple[Tensor, ...]
    """Per layer, the state in fla's value-first layout, float32. (B, H, Dv/H, Dk/H)"""
    pos: int
    """Tokens of the stream seen so far."""
    batch_size: int
    """B: streams carried side by side."""

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> GLAState:
        return replace(self, layers=tuple(fn(t) for t in self.layers))

    def detach(self) -> GLAState:
        """Cut the autograd graph (truncated backprop through time between windows)."""
        return self.map_tensors(Tensor.detach)

    def reset_streams(self, fresh: Tensor) -> GLAState:
        """The state with the streams where ``fresh`` (B,) is true zeroed, as at a stream's start."""
        keep = (~fresh).to(torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return self.map_tensors(lambda t: t * keep.to(t.device, t.dtype))

    def expand(self, batch_size: int) -> GLAState:
        """A batch-1 state repeated ``batch_size`` times (many continuations of one context)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a state of batch_size=1, got {self.batch_size}")
        repeated = self.map_tensors(lambda t: t.expand(batch_size, *t.shape[1:]).contiguous())  # (B, H, Dv/H, Dk/H)
        return replace(repeated, batch_size=batch_size)

    def to(self, device: torch.device | str) -> GLAState:
        return self.map_tensors(lambda t: t.to(device))

    def clone(self) -> GLAState:
        """A copy that shares no tensor storage with this state."""
        return self.map_tensors(Tensor.clone)


class _LayerStates:
    """The cache object fla's layers read and write during one call (``len``, ``cache[i]``,
    ``cache.update(layer_idx=i, recurrent_state=...)``): each layer's state before the call, then
    after it. Mutable, so it lives inside one forward pass only."""

    def __init__(self, states: list[Tensor | None]) -> None:
        self.states = states

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> dict[str, Any]:
        return {"recurrent_state": self.states[layer_idx], "conv_state": None}

    def update(self, layer_idx: int, recurrent_state: Tensor | None = None, **_: Any) -> None:
        self.states[layer_idx] = recurrent_state


class GLABlock(nn.Module):
    """``h += GLA(norm(h))``, ``h += GLU_MLP(norm(h))``: the transformer block with fla's GLA layer
    in place of attention."""

    def __init__(self, config: GLAPeerConfig, layer_idx: int, gla_layer: type[nn.Module]) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = gla_layer(mode="chunk", hidden_size=config.d_model, expand_k=config.expand_k,
                              expand_v=config.expand_v, num_heads=config.n_heads,
                              gate_low_rank_dim=config.gate_low_rank_dim, norm_eps=config.norm_eps,
                              layer_idx=layer_idx)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = GLUMLP(config.d_model, config.mlp_hidden)

    def forward(self, h: Tensor, states: _LayerStates) -> Tensor:
        y = self.attn(self.attn_norm(h), past_key_values=states, use_cache=True)[0]  # (B, L, D)
        h = h + y
        return h + self.mlp(self.mlp_norm(h))  # (B, L, D)


class GLAPeerLM(nn.Module):
    """``model(tokens, state) -> (logits, new_state)`` with ``state`` a :class:`GLAState`; feeding
    a stream in pieces gives the logits of one call (up to the kernels' rounding)."""

    def __init__(self, config: GLAPeerConfig) -> None:
        super().__init__()
        gla_layer = _fla("fla.layers.gla").GatedLinearAttention
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(GLABlock(config, i, gla_layer) for i in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.init_std)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def carries_state(self) -> bool:
        """Whether training and scoring carry the state across windows (``carry_state``)."""
        return self.config.carry_state

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> GLAState:
        """The state at a stream's start: zeros."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else self.embed.weight.device
        cfg = self.config
        shape = (batch_size, cfg.n_heads, cfg.value_dim // cfg.n_heads, cfg.key_dim // cfg.n_heads)
        zeros = tuple(torch.zeros(shape, device=device) for _ in range(cfg.n_layers))  # (B, H, Dv/H, Dk/H) each
        return GLAState(layers=zeros, pos=0, batch_size=batch_size)

    def forward(self, tokens: Tensor, state: GLAState | None = None) -> tuple[Tensor, GLAState]:
        check_tokens(tokens, self.config.vocab_size)
        batch, length = tokens.shape
        if state is not None and not isinstance(state, GLAState):
            raise ValueError(f"state must be a GLAState, got {type(state).__name__}")
        if state is not None and state.batch_size != batch:
            raise ValueError(f"state batch_size={state.batch_size} does not match tokens batch size {batch}")
        # A stream's start passes zeros, not None: fla's kernels autotune per argument signature, and
        # None would tune a second set of its three largest kernels for the first window alone.
        state = self.init_state(batch, tokens.device) if state is None else state
        states = _LayerStates([t.float() for t in state.layers])  # (B, H, Dv/H, Dk/H) each
        h = self.embed(tokens.long())  # (B, L, D)
        for block in self.blocks:
            h = block(h, states)  # (B, L, D)
        logits = self.head(self.final_norm(h))  # (B, L, V)
        return logits, GLAState(layers=tuple(states.states), pos=state.pos + length, batch_size=batch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gla_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """GLA's recurrence one token at a time in float64: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
    ``o_t = q_t S_t / sqrt(K)``. Inputs (B, T, H, K) (v: (B, T, H, V)), state (B, H, K, V);
    returns the outputs (B, T, H, V) and the final state (B, H, K, V)."""
    q, k, v, g = (t.double() for t in (q, k, v, g))  # (B, T, H, K) (v: V)
    state = h0.double()  # (B, H, K, V)
    scale = q.shape[-1] ** -0.5
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp().unsqueeze(-1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))  # (B, H, V)
    return torch.stack(outputs, 1), state  # (B, T, H, V), (B, H, K, V)


def check_gla_kernel(device: torch.device, batch: int = 2, length: int = 300, heads: int = 3, key_dim: int = 128,
                     value_dim: int = 256, seed: int = 0) -> dict[str, float]:
    """fla's chunked GLA kernel (``chunk_gla``, the one the peer trains with, in the layer's
    value-first state layout) against :func:`gla_reference`, forward and backward, float32 inputs:
    the relative error of the outputs, the final state and every gradient. fla refuses some
    backward kernels on Hopper with Triton < 3.7.1 for wrong results; this measures GLA's on the
    machine that trains it (the base preset's head shape by default)."""
    chunk_gla = _fla("fla.ops.gla").chunk_gla
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device)  # (shape)

    q = randn(batch, length, heads, key_dim)  # (B, T, H, K)
    k = randn(batch, length, heads, key_dim)  # (B, T, H, K)
    v = randn(batch, length, heads, value_dim)  # (B, T, H, V)
    g = F.logsigmoid(randn(batch, length, heads, key_dim)) / 16  # (B, T, H, K) the layer's gate range
    h0 = randn(batch, heads, key_dim, value_dim)  # (B, H, K, V)
    d_out = randn(batch, length, heads, value_dim)  # (B, T, H, V)
    d_state = randn(batch, heads, key_dim, value_dim)  # (B, H, K, V)
    inputs = [t.requires_grad_() for t in (q, k, v, g, h0)]
    out, final = chunk_gla(q, k, v, g, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
                           state_v_first=True)  # (B, T, H, V), (B, H, V, K)
    final = final.transpose(-1, -2)  # (B, H, K, V)
    grads = torch.autograd.grad((out * d_out).sum() + (final * d_state).sum(), inputs)  # shaped as the inputs
    ref_out, ref_final = gla_reference(q, k, v, g, h0)  # (B, T, H, V), (B, H, K, V)
    ref_loss = (ref_out * d_out.double()).sum() + (ref_final * d_state.double()).sum()  # ()
    ref_grads = torch.autograd.grad(ref_loss, inputs)  # shaped as the inputs

    def rel(a: Tensor, b: Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    result = {"output_rel_err": rel(out, ref_out), "final_state_rel_err": rel(final, ref_final)}
    for name, got, want in zip(("q", "k", "v", "g", "initial_state"), grads, ref_grads):
        result[f"grad_{name}_rel_err"] = rel(got, want)
    return result
