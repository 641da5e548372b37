"""On-Policy Harness Self-Distillation (OPHSD) in JAX/Flax."""

__version__ = "0.1.0"
