"""Specification of `certprune evaluate`: PGD robust accuracy of a run into its metrics.json; bad input fails in
one line."""
import json

import pytest

from certprune.config import load_config
from certprune.models import create_model
from certprune.runs import save_model, write_config, write_metrics
from helpers import assert_one_line_error, run


@pytest.fixture
def run_dir(tmp_path):
    """A finished run of cnn-small on the embedded MNIST (untrained weights are enough to attack)."""
    run = tmp_path / "run"
    run.mkdir()
    architecture = {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    save_model(create_model("cnn-small"), run / "model.pt", architecture)
    write_config(run, load_config(overrides=[{"loss": {"name": "pgd", "eps": 0.1}}]))
    write_metrics(run, {"method": "dense", "sparsity": 0.0})
    return run


def invoke(*args):
    return run("evaluate", *args)


def only_record(run_dir):
    """The one evaluation record of a run whose config has no attack section: keyed by what it asked for."""
    (record,) = json.loads((run_dir / "metrics.json").read_text())["evaluations"].values()
    return record


def test_evaluate_writes_pgd_accuracy_and_the_attack_into_metrics(run_dir):
    result = invoke("--from", str(run_dir), "--attack", "pgd", "--eps", "8/255", "--steps", "3", "--restarts", "2",
                    "--max", "100")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "metrics.json").read_text())["method"] == "dense"  # the run's facts are kept
    metrics = only_record(run_dir)
    assert metrics["images"]["count"] == 100 and metrics["settings"]["eps"] == pytest.approx(8 / 255)
    assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1
    assert metrics["attack"] == {"attack": "pgd", "norm": "linf", "eps": pytest.approx(8 / 255), "steps": 3,
                                 "step_size": pytest.approx(2.5 * 8 / 255 / 3), "restarts": 2, "objective": "ce",
                                 "start": "uniform"}
    assert metrics["attack_examples"] == 100
    assert list(json.loads(result.stdout).values()) == [metrics]


def test_evaluate_defaults_to_the_training_eps_and_takes_l2_and_a_step_size(run_dir):
    result = invoke("--from", str(run_dir), "--norm", "l2", "--step-size", "1/20", "--steps", "2", "--max", "50")
    assert result.exit_code == 0, result.output
    attack = only_record(run_dir)["attack"]
    assert attack["norm"] == "l2" and attack["eps"] == 0.1 and attack["step_size"] == 0.05


@pytest.mark.parametrize("args, message", [
    (["--eps", "8/0"], "divides by zero"), (["--eps", "abc"], "fraction like 8/255"),
    (["--eps", "-0.1"], ">= 0"), (["--eps", "-8/255"], ">= 0"),
    (["--steps", "0"], "attack.steps must be a whole number > 0"), (["--steps", "-5"], "attack.steps must be"),
    (["--restarts", "0"], "restarts"), (["--step-size", "x"], "step_size"), (["--max", "0"], "attack.max must be"),
    (["--max", "-1495"], "attack.max must be"), (["--batch-size", "-5"], "attack.batch_size must be"),
    (["--eps", "inf"], "finite")])
def test_bad_attack_settings_fail_in_one_line_before_any_file_is_written(run_dir, args, message):
    before = sorted(p.name for p in run_dir.iterdir())
    assert_one_line_error(invoke("--from", str(run_dir), *args), message)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_missing_run_fails_in_one_line(tmp_path):
    assert_one_line_error(invoke("--from", str(tmp_path / "nothing"), "--eps", "0.1"), "no trained model")
