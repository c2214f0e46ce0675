"""The GLA peer (flash-linear-attention): what can be checked without fla (its config, its state,
the registries, the clear error when fla is missing), what needs fla but no GPU (construction,
parameter counts, checkpoints), and on a GPU its kernel and streaming. fla's kernels are Triton
GPU kernels: no forward pass runs here on a CPU. CI does not install fla, so the middle group skips
there, and the last one everywhere without CUDA."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from horizonlm.bench.quality import ABLATIONS
from horizonlm.bench.recall import RecallConfig, scaled_config
from horizonlm.bench.speed import SpeedConfig
from horizonlm.checkpoint import MODEL_KINDS, build_model, carries_state
from horizonlm.cli import main
from horizonlm.config import HORIZON_PRESETS, HorizonConfig
from horizonlm.errors import HorizonError
from horizonlm.peers.gla import GLA_MLP_HIDDEN, GLAPeerConfig, GLAPeerLM, GLAState, gla_reference
from horizonlm.state_io import state_from_tensors, state_to_tensors
from horizonlm.train import TrainConfig

FLA_MODULES = ("fla", "fla.layers", "fla.layers.gla", "fla.ops", "fla.ops.gla")


@pytest.fixture
def no_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make fla unimportable, whether or not it is installed."""
    for name in FLA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def test_presets_follow_horizonlm_shapes() -> None:
    assert set(GLA_MLP_HIDDEN) == set(HORIZON_PRESETS)
    for name in HORIZON_PRESETS:
        peer, horizon = GLAPeerConfig.preset(name), HorizonConfig.preset(name)
        assert (peer.d_model, peer.n_layers, peer.vocab_size) == (horizon.d_model, horizon.n_layers, horizon.vocab_size)
        assert peer.mlp_hidden == GLA_MLP_HIDDEN[name] and peer.carry_state
    base = GLAPeerConfig.preset("base")
    assert (base.n_heads, base.key_dim // base.n_heads, base.value_dim // base.n_heads) == (3, 128, 256)
    assert GLAPeerConfig.preset("tiny", carry_state=False).carry_state is False


@pytest.mark.parametrize("fields, message", [
    ({"d_model": 0}, "d_model must be a positive integer"),
    ({"n_heads": 3}, "n_heads must divide d_model \\* expand_k = 128"),
    ({"expand_k": 0.3}, "expand_k must make d_model \\* expand_k"),
    ({"expand_v": -1.0}, "expand_v must be a positive number"),
    ({"carry_state": "yes"}, "carry_state must be true or false"),
    ({"norm_eps": 0.0}, "norm_eps must be positive"),
])
def test_config_refuses_what_the_layer_cannot_take(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GLAPeerConfig(**fields)


def test_config_round_trip_and_unknown_fields() -> None:
    cfg = GLAPeerConfig.preset("small")
    assert GLAPeerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GLAPeerConfig fields: use_ssm"):
        GLAPeerConfig.from_dict({**cfg.to_dict(), "use_ssm": False})
    with pytest.raises(ValueError, match="preset must be one of"):
        GLAPeerConfig.preset("huge")


def test_missing_fla_is_a_clear_error(no_fla: None) -> None:
    with pytest.raises(HorizonError, match=r"flash-linear-attention.*pip install 'horizonlm\[peers\]'"):
        GLAPeerLM(GLAPeerConfig.preset("tiny"))
    with pytest.raises(HorizonError, match=r"pip install 'horizonlm\[peers\]'"):
        build_model("gla", GLAPeerConfig.preset("tiny").to_dict())


def test_bench_quality_without_fla_fails_before_any_training(no_fla: None, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "quality", "--models", "horizon,gla", "--preset", "tiny", "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "q.json"), "--device", "cpu"]) == 2
    assert "pip install 'horizonlm[peers]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "q.json").exists()


def test_registered_with_every_command_and_bench() -> None:
    assert MODEL_KINDS["gla"] == (GLAPeerLM, GLAPeerConfig)
    assert ABLATIONS["gla"] == ("gla", {})
    train = TrainConfig(model="gla", preset="tiny", model_overrides={"mlp_hidden": 96})
    assert train.model_config(256) == GLAPeerConfig.preset("tiny", mlp_hidden=96).to_dict()
    with pytest.raises(ValueError, match="'use_ssm' is not a setting of the gla model"):
        TrainConfig(model="gla", model_overrides={"use_ssm": False})
    assert SpeedConfig(models="horizon,gla").model_list == ["horizon", "gla"]
    with pytest.raises(ValueError, match="models must name some of"):
        SpeedConfig(models="mamba")


def test_recall_peer_matches_the_horizonlm_of_each_width() -> None:
    cfg = RecallConfig(models="gla", rungs="1", widths="128", preset="small")
    kind, config = scaled_config(cfg, "gla", 128)
    horizon = HorizonConfig.from_dict(scaled_config(cfg, "horizon", 128)[1])
    assert kind == "gla" and config == GLAPeerConfig.matching(horizon).to_dict()
    assert (config["d_model"], config["n_layers"], config["vocab_size"]) == (128, 2, 8192)


def _state(batch: int = 3) -> GLAState:
    torch.manual_seed(0)
    layers = tuple(torch.randn(batch, 2, 8, 4) for _ in range(3))  # (B, H, Dv/H, Dk/H) each
    return GLAState(layers=layers, pos=40, batch_size=batch)


def test_state_resets_streams_detaches_and_expands() -> None:
    state = _state()
    fresh = torch.tensor([False, True, False])  # (B,)
    reset = state.reset_streams(fresh)
    for before, after in zip(state.layers, reset.layers):
        assert torch.equal(after[1], torch.zeros_like(after[1]))
        assert torch.equal(after[[0, 2]], before[[0, 2]])
    one = GLAState(layers=tuple(t[:1] for t in state.layers), pos=40, batch_size=1).expand(4)
    assert one.batch_size == 4 and all(t.shape[0] == 4 and torch.equal(t[3], t[0]) for t in one.layers)
    with pytest.raises(ValueError, match="batch_size=1"):
        state.expand(2)
    tracked = torch.ones(1, 1, 2, 2, requires_grad=True) * 2  # (B, H, Dv/H, Dk/H)
    grad = GLAState(layers=(tracked,), pos=0, batch_size=1)
    assert not grad.detach().layers[0].requires_grad


def test_state_saves_and_loads_with_the_training_checkpoint_format() -> None:
    state = _state()
    tensors, header = state_to_tensors(state, prefix="state0.")
    assert header == {"kind": "gla", "pos": 40, "batch_size": 3, "layers": 3}
    loaded = state_from_tensors(tensors, header, prefix="state0.")
    assert isinstance(loaded, GLAState) and loaded.pos == 40
    assert all(torch.equal(a, b) for a, b in zip(loaded.layers, state.layers))
    with pytest.raises(HorizonError, match="incomplete"):
        state_from_tensors({}, header)


def test_float64_reference_streams_through_its_state() -> None:
    """The reference the GPU check measures fla against: two pieces through the state equal one call."""
    gen = torch.Generator().manual_seed(0)
    q, k, g = (torch.randn(2, 30, 2, 4, generator=gen) for _ in range(3))  # (B, T, H, K)
    v = torch.randn(2, 30, 2, 6, generator=gen)  # (B, T, H, V)
    g = torch.nn.functional.logsigmoid(g)  # (B, T, H, K)
    h0 = torch.randn(2, 2, 4, 6, generator=gen)  # (B, H, K, V)
    out, final = gla_reference(q, k, v, g, h0)  # (B, T, H, V), (B, H, K, V)
    first, mid = gla_reference(q[:, :11], k[:, :11], v[:, :11], g[:, :11], h0)
    second, end = gla_reference(q[:, 11:], k[:, 11:], v[:, 11:], g[:, 11:], mid)
    assert torch.allclose(torch.cat([first, second], 1), out) and torch.allclose(end, final)
    decayed = h0 * g[:, 0].exp().unsqueeze(-1)  # (B, H, K, V)
    state = decayed + k[:, 0].unsqueeze(-1) * v[:, 0].unsqueeze(-2)  # (B, H, K, V)
    first_out = torch.einsum("bhk,bhkv->bhv", q[:, 0] / 2, state)  # (B, H, V) scale 1/sqrt(K=4)
    assert torch.allclose(out[:, 0], first_out.double())


def test_harness_carries_the_state_as_the_config_says() -> None:
    class Peer(torch.nn.Module):
        def __init__(self, carry: bool) -> None:
            super().__init__()
            self.carries_state = carry

    assert carries_state(Peer(True)) and not carries_state(Peer(False))


@pytest.mark.parametrize("preset", sorted(HORIZON_PRESETS))
def test_the_peer_preset_has_at_least_horizonlms_parameters(preset: str) -> None:
    """Counted without fla (the count is checked against the built model below, where fla is)."""
    from horizonlm.model import HorizonLM

    with torch.device("meta"):
        horizon = HorizonLM(HorizonConfig.preset(preset)).num_parameters()
    peer = GLAPeerConfig.preset(preset)
    assert horizon <= peer.num_parameters() <= 1.06 * horizon
    assert replace(peer, mlp_hidden=peer.mlp_hidden - 16).num_parameters() < horizon  # the narrowest that reaches it


def test_parameter_count_by_hand() -> None:
    """The tiny peer's count written out: embedding 256 x 32, final norm 32; per block two norms
    (64), q and k (2 x 32 x 16), v and the output gate (2 x 32 x 32), the forget gate
    (32 x 16 + 16 x 16 + 16), the output (32 x 32), the head norm (32), the MLP (3 x 32 x 96)."""
    block = 64 + 1024 + 2048 + (512 + 256 + 16) + 1024 + 32 + 9216
    assert GLAPeerConfig.preset("tiny").num_parameters() == 256 * 32 + 32 + 2 * block
    untied = GLAPeerConfig.preset("tiny", tie_embeddings=False)
    assert untied.num_parameters() == 2 * 256 * 32 + 32 + 2 * block


# With fla installed (no GPU needed: nothing below runs a forward pass).


@pytest.mark.parametrize("preset", sorted(HORIZON_PRESETS))
def test_the_peer_has_at_least_horizonlms_parameters(preset: str) -> None:
    pytest.importorskip("fla.layers.gla")
    from horizonlm.model import HorizonLM

    with torch.device("meta"):
        peer = GLAPeerLM(GLAPeerConfig.preset(preset))
        horizon = HorizonLM(HorizonConfig.preset(preset))
    assert peer.num_parameters() == GLAPeerConfig.preset(preset).num_parameters() >= horizon.num_parameters()
    assert carries_state(peer) and peer.head.weight is peer.embed.weight


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("fla.layers.gla")
    from horizonlm.checkpoint import load_checkpoint, model_kind, save_checkpoint

    torch.manual_seed(0)
    model = GLAPeerLM(GLAPeerConfig.preset("tiny"))
    save_checkpoint(tmp_path, 3, model, {"tokenizer": {"kind": "byte"}})
    loaded = load_checkpoint(tmp_path, expect_kind="gla")
    assert model_kind(loaded.model) == "gla" and loaded.model.head.weight is loaded.model.embed.weight
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())


# On a GPU with fla.


def _gpu() -> torch.device:
    pytest.importorskip("fla.layers.gla")
    if not torch.cuda.is_available():
        pytest.skip("fla's kernels need a CUDA GPU")
    return torch.device("cuda")


def test_fla_kernel_matches_the_float64_recurrence_forward_and_backward() -> None:
    from horizonlm.peers.gla import check_gla_kernel

    errors = check_gla_kernel(_gpu())
    assert max(errors.values()) < 1e-2, errors


def test_streaming_equals_one_call_on_gpu() -> None:
    device = _gpu()
    torch.manual_seed(0)
    model = GLAPeerLM(GLAPeerConfig.preset("small")).to(device)
    tokens = torch.randint(0, 256, (2, 700), device=device)  # (B, T)
    with torch.no_grad():
        full, state = model(tokens)  # (B, T, V)
        first, mid = model(tokens[:, :300])  # (B, 300, V)
        second, end = model(tokens[:, 300:], mid)  # (B, 400, V)
    assert ((torch.cat([first, second], 1) - full).norm() / full.norm()).item() < 1e-2
    assert end.pos == state.pos == 700
