"""CPU smoke run of experiments/studies/train_lm.py: the loss falls, checkpoints resume, nothing recompiles,
    and gradients
reach every parameter of the scanned, rematerialised model."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "studies"))

import train_lm


def test_smoke_training_loss_falls_and_resumes(tmp_path):
    common = ["--preset", "smoke", "--out", str(tmp_path), "--runs", "hyper", "--steps", "24", "--quiet"]
    interrupted = train_lm.main([*common, "--stop-after", "10", "--no-eval"])
    assert interrupted["runs"]["hyper"]["steps_done"] == 10
    results = train_lm.main([*common, "--resume"])
    run = results["runs"]["hyper"]
    assert run["steps_done"] == 24
    assert run["history"]["step"] == list(range(24))  # resumed at 10, history restored from the checkpoint
    loss = np.asarray(run["history"]["loss"])
    assert loss[-6:].mean() < loss[:6].mean() - 0.5, loss  # nats per byte; starts near log(256) = 5.5
    assert results["traces"]["train_step/hyper"] == 1  # one compilation for both invocations and every step
    for value in run["eval_bits_per_byte"].values():
        assert 0 < value < 8.5
    with open(tmp_path / "train_lm.json") as f:
        assert json.load(f)["runs"]["hyper"]["steps_done"] == 24
    assert (tmp_path / "train_lm.png").stat().st_size > 0
    # Gradients reach every parameter of every (scanned, rematerialised) layer.
    min_grad_norms = interrupted["runs"]["hyper"]["history"]["first_step_min_grad_norm"]
    assert len(min_grad_norms) >= 10 and all(0 < g < float("inf") for g in min_grad_norms.values()), min_grad_norms
