"""train.py's command line: one line `train.py: error: ...` for every error a user can cause,
naming the field, file or folder and the fix; --print_config shows the resolved config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import tiny


def _train_py(*args: str, cwd=tiny.REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tiny.REPO_ROOT / "train.py"), *args],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The error line, after checking that it is the only thing train.py said about the error."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    assert errors[0].startswith("train.py: error: ")
    return errors[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--config.train.learning_rat=1"],
            "has no field 'train.learning_rat'. Did you mean \"learning_rate\"",
        ),
        (  # with --config given, ml_collections reads the overrides at another time
            ["--config", "configs/default.py", "--config.train.foo=1"],
            "--config.train.foo: the config has no field 'train.foo'.",
        ),
        (["--config.train.learning_rate=fast"], "--config.train.learning_rate=fast: could not convert"),
        (["--config", "configs/nope.py"], "--config: [Errno 2] No such file or directory: 'configs/nope.py'"),
    ],
    ids=["unknown field", "unknown field after --config", "bad value", "missing config file"],
)
def test_bad_config_flags_get_one_line(tmp_path, args, expected):
    line = _one_error_line(_train_py("--workdir", str(tmp_path / "run"), *args))
    assert expected in line
    if "no field" in line:
        assert "configs/default.py" in line and "--print_config" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config.train.learning_rate=-1e-4"], "train.learning_rate must be a number >= 0"),
        (["--config.model.name=models/bert"], "No such folder: {cwd}/models/bert."),
    ],
    ids=["negative learning rate", "missing model folder"],
)
def test_library_errors_become_one_line(tmp_path, args, expected):
    (tmp_path / "models").mkdir()
    line = _one_error_line(_train_py("--workdir", str(tmp_path / "run"), *args, cwd=tmp_path))
    assert expected.format(cwd=tmp_path) in line
    assert not (tmp_path / "run").exists()


def test_print_config_shows_the_overrides_and_exits(tmp_path):
    result = _train_py("--workdir", str(tmp_path / "run"), "--config.train.seed=17", "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "  seed: 17\n" in result.stdout and "  learning_rate: 0.0001\n" in result.stdout
    assert not (tmp_path / "run").exists()


def test_help_points_to_the_fields():
    result = _train_py("--helpshort")  # absl exits 1 after printing help
    assert "configs/default.py" in result.stdout and "--print_config" in result.stdout
