"""Shared test settings: CPU, float32 matmuls at full precision, one persistent compilation cache.

Parity tests compare to 1e-4..1e-6, hence "highest" matmul precision. Many tests rebuild identical
programs through fresh closures (train loops, decoders per fixture); a persistent compilation cache for
the session (also inherited by subprocesses through the environment) makes the repeats cheap without
changing what is computed.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlpeft_jax_test_cache_"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_caches(tmp_path_factory):
    """Cache directories shared by the end-to-end tests: the shapes world and the pretrained smoke base are
    built once per session (the runner caches them by content, so sharing changes no result)."""
    root = tmp_path_factory.mktemp("shared_caches")
    return {"data": root / "shapes", "pretrain": root / "pretrained"}
