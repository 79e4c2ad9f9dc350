"""example.py runs end to end (on the CPU reference path here, on the GPU where there is one)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "example.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="example.py is not beside tests/ (installed-wheel run)")
def test_example_runs_and_checks_every_step(capsys):
    spec = importlib.util.spec_from_file_location("example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "3", "--batch", "2", "--heads", "4", "--prompt-len", "64"])
    out = capsys.readouterr().out
    assert "3 steps of batch 2 x 4 heads" in out and "every step within" in out


@pytest.mark.skipif(not EXAMPLE.exists(), reason="example.py is not beside tests/ (installed-wheel run)")
def test_example_hugging_face_section(capsys):
    spec = importlib.util.spec_from_file_location("example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--hf"])
    assert "100% of tokens equal" in capsys.readouterr().out
