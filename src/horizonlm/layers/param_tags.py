"""Attributes set on parameters that the optimizer treats apart."""

SSM_PARAM_TAG = "horizon_ssm"
"""Set on SSM dynamics parameters (A, dt, C, D): they get no weight decay and their own learning
rate (DESIGN.md part 1)."""
