"""Reusable harnesses for end-to-end tests and benchmarks (real external components)."""
