"""Test setup: 8 fake CPU devices and the persistent compilation cache (compiles dominate)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("HYDRA_JAX_TEST_CACHE",
                                     pathlib.Path.home() / ".cache" / "hydra_jax" / "jax_tests"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
