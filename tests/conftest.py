"""Eight fake CPU devices for every test (set before JAX is imported), float32 matmuls."""

import os
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests (and the train.py/eval.py processes they start) compile the same small programs again and
# again: a persistent compilation cache shared by all of them saves minutes.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gaml-jax-test-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """(checkpoint folder, train.csv, dev.csv) of the tiny model and task in tests/tiny.py."""
    from tests import tiny

    root = tmp_path_factory.mktemp("tiny")
    return (tiny.make_checkpoint(root / "model"), *tiny.make_task(root / "data"))
