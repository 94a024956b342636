"""Specification of ``certprune certify``: one-line errors for bad input, resumable output, the sigma warning."""
import json

import pytest
import torch

from certprune.config import load_config
from certprune.models import create_model
from certprune.runs import save_model, write_config
from helpers import assert_one_line_error, interrupt_certify_after, run


@pytest.fixture
def run_dir(tmp_path):
    """A finished run as the pipeline leaves it: model.pt and config.yaml (trained with sigma 0.25)."""
    run_dir = tmp_path / "gaussian"
    architecture = {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    torch.manual_seed(0)
    save_model(create_model("cnn-small"), run_dir / "model.pt", architecture)
    write_config(run_dir, load_config(None, [{"loss": {"name": "gaussian", "sigma": 0.25}, "verify": None}]))
    return run_dir


def certify(*args):
    return run("certify", *args)


@pytest.mark.parametrize("flags, fragment", [
    (["--sigma", "0"], "sigma must be"),
    (["--sigma", "-0.25"], "sigma must be"),
    (["--n0", "0"], "n0 must be"),
    (["--n", "0"], "n must be"),
    (["--n", "-5"], "n must be"),
    (["--alpha", "0"], "alpha must be"),
    (["--alpha", "1"], "alpha must be"),
    (["--alpha", "1.5"], "alpha must be"),
    (["--skip", "0"], "skip must be"),
    (["--max", "0"], "max must be"),
    (["--precision", "fp16"], "smoothing.precision: Input should be 'fp32' or 'bf16'"),
])
def test_bad_parameters_give_a_one_line_error(run_dir, flags, fragment):
    assert_one_line_error(certify("--from", run_dir, *flags), fragment)
    assert not (run_dir / "certify.tsv").exists()


def test_an_unreadable_run_gives_a_one_line_error(tmp_path):
    assert_one_line_error(certify("--from", tmp_path / "missing"), "no trained model")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(certify("--from", tmp_path / "broken", "--sigma", "0.25"), "damaged or not a checkpoint")


def test_certify_writes_the_tsv_and_the_summary_and_resumes_after_an_interruption(run_dir, monkeypatch):
    interrupt_certify_after(monkeypatch, 2)
    result = certify("--from", run_dir, "--n0", 10, "--n", 50, "--max", 4)
    assert result.exit_code == 130 and "rerun the same command" in result.output
    monkeypatch.undo()
    result = certify("--from", run_dir, "--n0", 10, "--n", 50, "--max", 4)
    assert result.exit_code == 0, result.output
    assert_one_line_error(certify("--from", run_dir, "--n0", 10, "--n", 50, "--max", 4, "--precision", "bf16"),
                          "precision fp32 -> bf16")
    rows = (run_dir / "certify.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == [0, 1, 2, 3]
    records = json.loads((run_dir / "metrics.json").read_text())["evaluations"]
    assert list(records) == ["smoothing[max=4, sigma=0.25, n0=10, n=50]"]  # named by the settings it was made with
    metrics = records["smoothing[max=4, sigma=0.25, n0=10, n=50]"]
    assert metrics["images"]["count"] == 4 and metrics["settings"]["sigma"] == 0.25
    assert metrics["sigma"] == 0.25 and metrics["n"] == 50 and metrics["alpha"] == 0.001
    assert metrics["precision"] == "fp32" and metrics["seconds_per_image"] > 0
    assert set(metrics["certified_acc"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert 0 <= metrics["abstain_rate"] <= 1 and metrics["acr"] >= 0 and metrics["certified_examples"] == 4


def test_certifying_with_another_sigma_warns_once(run_dir):
    result = certify("--from", run_dir, "--sigma", 0.5, "--n0", 10, "--n", 20, "--max", 3, "--restart")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("Warning:") == 1 and "trained with sigma=0.25" in result.stderr
