"""Benchmarks: they measure and write what they measured, with the machine and the command."""
