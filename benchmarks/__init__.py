"""Benchmarks of med3d-hub against the baselines users have today: ``python -m benchmarks``."""
