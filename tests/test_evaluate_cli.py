"""Specification of `certprune evaluate`: PGD robust accuracy of a run into its metrics.json; bad input fails in
one line."""
import json

import pytest
from click.testing import CliRunner

from certprune.cli import main
from certprune.config import load_config, save_config
from certprune.models import create_model
from certprune.runs import save_model, write_metrics


@pytest.fixture
def run_dir(tmp_path):
    """A finished run of cnn-small on the embedded MNIST (untrained weights are enough to attack)."""
    run = tmp_path / "run"
    run.mkdir()
    architecture = {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    save_model(create_model("cnn-small"), run / "model.pt", architecture)
    save_config(load_config(overrides=[{"loss": {"name": "pgd", "eps": 0.1}}]), run / "config.yaml")
    write_metrics(run, {"method": "dense", "sparsity": 0.0})
    return run


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *args])


def test_evaluate_writes_pgd_accuracy_and_the_attack_into_metrics(run_dir):
    result = invoke("--from", str(run_dir), "--attack", "pgd", "--eps", "8/255", "--steps", "3", "--restarts", "2",
                    "--max", "100")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "dense"  # earlier figures are kept
    assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1
    assert metrics["attack"] == {"attack": "pgd", "norm": "linf", "eps": pytest.approx(8 / 255), "steps": 3,
                                 "step_size": pytest.approx(2.5 * 8 / 255 / 3), "restarts": 2, "objective": "ce",
                                 "start": "uniform"}
    assert metrics["attack_examples"] == 100
    assert json.loads(result.output)["pgd_acc"] == metrics["pgd_acc"]


def test_evaluate_defaults_to_the_training_eps_and_takes_l2_and_a_step_size(run_dir):
    result = invoke("--from", str(run_dir), "--norm", "l2", "--step-size", "1/20", "--steps", "2", "--max", "50")
    assert result.exit_code == 0, result.output
    attack = json.loads((run_dir / "metrics.json").read_text())["attack"]
    assert attack["norm"] == "l2" and attack["eps"] == 0.1 and attack["step_size"] == 0.05


@pytest.mark.parametrize("args, message", [
    (["--eps", "8/0"], "divides by zero"), (["--eps", "abc"], "fraction like 8/255"),
    (["--eps", "-0.1"], ">= 0"), (["--eps", "-8/255"], ">= 0"),
    (["--steps", "0"], "steps must be a positive integer"), (["--steps", "-5"], "steps must be a positive"),
    (["--restarts", "0"], "restarts"), (["--step-size", "x"], "step size"), (["--max", "0"], "--max")])
def test_bad_attack_settings_fail_in_one_line(run_dir, args, message):
    result = invoke("--from", str(run_dir), *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


def test_a_missing_run_fails_in_one_line(tmp_path):
    result = invoke("--from", str(tmp_path / "nothing"), "--eps", "0.1")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "no trained model" in result.output
