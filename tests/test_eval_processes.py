"""One checkpoint evaluated twice, in two processes, gives identical per-sample records: timed routes are
decided once per machine and stored, so the second process computes exactly what the first did."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from ponder.config import config_from_dict
from ponder.engine import train
from ponder.evaluate.records import load_records
from ponder.fast import enabled as fast_enabled


def test_two_processes_evaluate_one_checkpoint_to_identical_records(tmp_path):
    cfg = config_from_dict({
        "model": {"name": "sact_resnet32_cifar", "kwargs": {"in_chans": 1}},
        "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 50, "limit_train": 128},
        "method": {"name": "ponder_cost", "kwargs": {"tau": 0.01}},
        "train": {"epochs": 1, "seed": 0, "device": "cpu"},
    })
    run = train(cfg, tmp_path / "run", verbose=False)
    env = dict(os.environ, PONDER_ROUTES_FILE=str(tmp_path / "routes.json"))  # nothing decided yet
    records = []
    for i in range(2):
        out = tmp_path / f"eval{i}"
        done = subprocess.run([sys.executable, "-m", "ponder.cli", "eval", str(run), "--out", str(out)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr
        records.append(load_records(out / "records_standard.safetensors"))
    first, second = records
    assert len(first) == 400 and first.active is not None  # every digits test image, with its masks
    for name, value in first.tensors().items():
        assert torch.equal(value, second.tensors()[name]), name
    if fast_enabled():  # with PONDER_FAST=0 nothing is timed, so nothing is stored
        assert (tmp_path / "routes.json").is_file()  # the first process stored the routes the second read
