"""Test configuration: import the project from the repo root, run JAX on the CPU, and share
compiled programs between the many tiny training runs of the suite.

Most end-to-end tests train the same tiny model in fresh ``train()`` calls or subprocesses;
each would compile the same train step again. A persistent compilation cache for this test
session (a fresh temporary folder, inherited by the subprocesses through the environment)
lets identical programs compile once. It changes no result: a cache hit loads the very
executable XLA produced for the same HLO.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cfm_jax_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.path.basename(cache).startswith("cfm_jax_test_xla_cache_"):
        import shutil
        shutil.rmtree(cache, ignore_errors=True)
