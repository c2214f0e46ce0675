"""The supervisor rule, tested directly: a token receives the GRU state of the chunks completed
strictly before it, so a chunk's last token (whose hidden state is that chunk's summary) gets
the state from before its own chunk, never the one its own chunk just produced."""

from __future__ import annotations

import pytest
import torch

from horizonlm.layers.supervisor import RecurrentSupervisor
from horizonlm.state import SupervisorState

C, D, S = 4, 6, 5


def _supervisor() -> RecurrentSupervisor:
    torch.manual_seed(0)
    return RecurrentSupervisor(D, S, C, eps=1e-5).double()


def _received_by_rule(sup: RecurrentSupervisor, h: torch.Tensor, s0: torch.Tensor, pos: int) -> torch.Tensor:
    """Per token, the state DESIGN.md says it receives, built chunk by chunk with the GRU:
    ``s`` is updated only after the token that completes a chunk has taken the old one."""
    hn = sup.norm(h)  # (B, L, D)
    s, received = s0, []
    for i in range(h.shape[1]):
        received.append(s)
        if (pos + i + 1) % C == 0:
            e = sup.summary(hn[:, i : i + 1])  # (B, 1, S)
            s = sup.gru(e, s.unsqueeze(0).contiguous())[1].squeeze(0)  # (B, S)
    return torch.stack(received, dim=1)  # (B, L, S)


def _update(sup: RecurrentSupervisor, h: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    hn = sup.norm(h)  # (B, L, D)
    return torch.sigmoid(sup.gate(hn)) * sup.inject(received)  # (B, L, D)


@pytest.mark.parametrize("pos", [0, 1, C - 1, 2 * C + 2])
def test_tokens_receive_only_completed_chunks(pos: int) -> None:
    sup = _supervisor()
    g = torch.Generator().manual_seed(pos)
    h = torch.randn(2, 3 * C + 1, D, generator=g, dtype=torch.float64)  # (B, L, D)
    s0 = torch.randn(2, S, generator=g, dtype=torch.float64)  # (B, S): nonzero, so chunk 0 is checked too
    with torch.no_grad():
        out, new_state = sup(h, SupervisorState(s=s0, pos=pos))
        received = _received_by_rule(sup, h, s0, pos)  # (B, L, S)
        torch.testing.assert_close(out - h, _update(sup, h, received), rtol=1e-12, atol=1e-12)
        last_tokens = [i for i in range(h.shape[1]) if (pos + i + 1) % C == 0]
        assert last_tokens
        for i in last_tokens:  # the state its own chunk produces is another one
            own = received[:, i + 1] if i + 1 < h.shape[1] else new_state.s
            assert not torch.allclose(out[:, i] - h[:, i], _update(sup, h[:, i : i + 1], own.unsqueeze(1))[:, 0])
    assert new_state.pos == pos + h.shape[1]


def test_last_token_stepped_alone_gets_the_state_before_its_chunk() -> None:
    """Decoding: the one-token call that completes a chunk reads the incoming state and only
    returns the updated one, which the next chunk's first token then receives."""
    sup = _supervisor()
    g = torch.Generator().manual_seed(7)
    s_in = torch.randn(1, S, generator=g, dtype=torch.float64)  # (B, S)
    last, first = torch.randn(2, 1, 1, D, generator=g, dtype=torch.float64)  # (B, 1, D) each
    with torch.no_grad():
        out_last, after = sup(last, SupervisorState(s=s_in, pos=C - 1))
        torch.testing.assert_close(out_last - last, _update(sup, last, s_in.unsqueeze(1)), rtol=1e-12, atol=1e-12)
        s_own = sup.gru(sup.summary(sup.norm(last)), s_in.unsqueeze(0).contiguous())[1].squeeze(0)  # (B, S)
        torch.testing.assert_close(after.s, s_own, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(after.s, s_in)
        out_first, _ = sup(first, after)
        torch.testing.assert_close(out_first - first, _update(sup, first, s_own.unsqueeze(1)), rtol=1e-12, atol=1e-12)
