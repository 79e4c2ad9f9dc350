"""example.py runs end to end (on the CPU reference path here, on the GPU where there is one)."""

import example


def test_example_runs_and_checks_every_step(capsys):
    example.main(["--steps", "3", "--batch", "2", "--heads", "4", "--prompt-len", "64"])
    out = capsys.readouterr().out
    assert "3 steps of batch 2 x 4 heads" in out and "every step within" in out
