"""Strict JAX settings for the whole suite: implicit dtype or rank promotion is a bug."""

import os

# 8 simulated CPU devices for pmap/shard_map tests; must be set before JAX starts its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
