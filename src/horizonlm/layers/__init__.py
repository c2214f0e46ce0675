"""nn.Modules built on ``horizonlm.ops``; each obeys ``forward(x, state=None) -> (y, new_state)``."""
