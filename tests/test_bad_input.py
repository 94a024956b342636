"""A new user's walk with bad input: every mistake is one line, exit status 1, before any work, and nothing is lost.

Each case names the defect of the "runs you can trust" review it guards against.
"""
import json

import pytest
import torch
import yaml

from certprune import pipeline, runs
from certprune.config import load_config
from certprune.evaluation import evaluate_configured
from certprune.runs import FORMAT
from helpers import TINY, assert_one_line_error, run, tiny_config

FAST = ["--set", "pretrain.epochs=1", "--set", "train_examples=64"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished dense run whose config states eps as a fraction, as every adversarial paper config does."""
    run_dir = tmp_path_factory.mktemp("walk") / "dense"
    config = tiny_config(pretrain={"epochs": 1}, verify={"max": 16, "eps": "8/255"})
    pipeline.pretrain(config, run_dir)
    evaluate_configured(run_dir, config)
    return run_dir


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


@pytest.mark.parametrize("args, fragment", [
    (["--set", "pretrain.epochs=ten"], "pretrain.epochs: Input should be a valid integer"),
    (["--set", "pretrain.epochs=1.5"], "pretrain.epochs: Input should be a valid integer"),
    (["--set", "pretrain.epochs=-3"], "pretrain.epochs must be a whole number >= 0"),
    (["--set", "pretrain.lr=fast"], "pretrain.lr: Input should be a valid number"),
    (["--set", "batch_size=big"], "batch_size: Input should be a valid integer"),
    (["--set", "batch_size=0"], "batch_size must be a whole number > 0"),
    (["--set", "loss=null"], "config loss: Input should be a valid dictionary"),
    (["--set", "loss.eps=abc"], "eps must be a number or a fraction like 8/255"),
    (["--set", "x=[1"], "override 'x=[1': the value is not valid YAML"),
    (["--eps", "nan"], "eps must be a finite number >= 0"),
    (["--eps", "inf"], "eps must be a finite number >= 0"),
    (["--set", "verify.bound_methods=[FOO]"], "unknown bound method 'FOO'"),
    (["--set", "prune_methods=[magnitude]"], "prune_methods.0: Input should be 'hydra' or 'lwm'"),
    (["--loss", "hinge"], "unknown loss 'hinge'"),
    (["--model", "resnet-9000"], "unknown model 'resnet-9000'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "cifar10"], "cifar10 needs --data-dir pointing at cifar-10-python.tar.gz from"),
    (["--eps", "1e400"], "eps must be a finite number >= 0"),
    (["--loss", "natural"], "verify needs an eps: the loss 'natural' has none"),
    (["--loss", "gaussian", "--sigma", "0.25"], "verify needs an eps: the loss 'gaussian' has none"),
    (["--set", "k=[0.1,0.1]"], "config k: lists each value once"),
    (["--set", "attack={step_size: 0}"], "attack.step_size: Input should be greater than 0"),
    (["--set", "verify.eps=true"], "eps must be a number or a fraction like 8/255, got True"),
    (["--set", "allocations=[layerwise, uniform]"], "unknown allocation 'uniform'; choose from layerwise, global"),
    (["--set", "allocations=[]"], "allocations: Value should have at least 1 item"),
    (["--set", "allocations=[erk, erk]"], "allocations: lists each value once"),
])
def test_bad_training_input_fails_in_one_line_and_leaves_no_file(tmp_path, args, fragment):
    for command in (["pretrain"], ["sweep"]):
        assert_one_line_error(run(*command, *FAST, *args, "--out", tmp_path / "out"), fragment)  # args win
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--set", "report_metric=verifed_acc"], "report_metric: no configured evaluation gives 'verifed_acc'"),
    (["--set", "verify=null", "--set", "attack={}"], "report_metric: no configured evaluation gives 'verified_acc'"),
])
def test_a_sweep_whose_table_would_be_empty_is_refused_before_training(tmp_path, args, fragment):
    assert_one_line_error(run("sweep", *FAST, *args, "--out", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_an_output_under_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    assert_one_line_error(run("pretrain", "--out", tmp_path / "file" / "run", *FAST), "Not a directory")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runs, "_open_lock", denied)
    assert_one_line_error(run("pretrain", "--out", tmp_path / "run", *FAST), "cannot write into")


@pytest.mark.parametrize("command, args, fragment", [
    ("verify", ["--max", "0"], "verify.max must be a whole number > 0"),
    ("verify", ["--max", "-1495"], "verify.max must be a whole number > 0"),
    ("verify", ["--batch-size", "-5"], "verify.batch_size must be a whole number > 0"),
    ("verify", ["--eps", "inf"], "eps must be a finite number >= 0"),
    ("verify", ["--method", "LP"], "unknown bound method 'LP'"),
    ("evaluate", ["--max", "0"], "attack.max must be a whole number > 0"),
    ("certify", ["--n", "0"], "smoothing.n must be a whole number > 0"),
    ("certify", [], "smoothing needs a sigma: the loss 'ibp' has none (set smoothing.sigma, or --sigma)"),
])
def test_bad_evaluation_input_fails_before_any_work_and_changes_nothing(finished, command, args, fragment):
    before = {name: (finished / name).read_bytes() for name in files(finished) if (finished / name).is_file()}
    assert_one_line_error(run(command, "--from", finished, *args), fragment)
    assert {name: (finished / name).read_bytes() for name in before} == before and files(finished) == sorted(before)


def test_verify_takes_the_fraction_eps_of_the_runs_config(finished):
    result = run("verify", "--from", finished, "--max", 8)
    assert result.exit_code == 0, result.output
    key = f"verify[max=8, eps={8 / 255}, bound_methods=IBP+CROWN-IBP]"
    record = json.loads((finished / "metrics.json").read_text())["evaluations"][key]
    assert record["settings"]["eps"] == pytest.approx(8 / 255) and record["images"]["count"] == 8


def test_a_damaged_metrics_file_fails_before_the_evaluation(finished, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.pt", "config.yaml"):
        (broken / name).write_bytes((finished / name).read_bytes())
    (broken / "metrics.json").write_text("{not json")
    assert_one_line_error(run("verify", "--from", broken), "metrics.json is not valid JSON")
    assert (broken / "metrics.json").read_text() == "{not json"


def test_a_second_process_on_a_run_directory_is_refused_in_one_line(finished):
    with runs.locked(finished):
        assert_one_line_error(run("verify", "--from", finished, "--max", 4), "is in use by another certprune process")
        assert_one_line_error(run("pretrain", "--out", finished, "--resume"), "in use by another")


def test_malicious_and_foreign_checkpoints_say_why_without_suggesting_to_turn_safety_off(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"format": FORMAT, "payload": Payload()}, tmp_path / "model.pt")
    result = run("verify", "--from", tmp_path)
    assert_one_line_error(result, "holds Python objects beyond tensors, which certprune never loads")
    assert "weights_only=False" not in result.output and "owned" not in result.output


def test_an_architecture_mismatch_names_the_offending_tensor(tmp_path):
    from certprune.models import create_model

    architecture = {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    torch.save({"format": FORMAT, "architecture": architecture, "state_dict": create_model("cnn-large").state_dict()},
               tmp_path / "model.pt")
    result = run("prune", "--k", 0.1, "--from", tmp_path, "--out", tmp_path / "out")
    assert_one_line_error(result, "does not fit this architecture (")
    assert "weight" in result.output and not (tmp_path / "out").exists()


def test_prune_needs_k_and_the_sources_data_set(finished, tmp_path):
    assert_one_line_error(run("prune", "--from", finished, "--out", tmp_path / "out"), "--k is required")
    result = run("prune", "--k", 0.1, "--from", finished, "--dataset", "fashion-mnist", "--out", tmp_path / "out")
    assert_one_line_error(result, "was trained on mnist-embedded, but the config prunes on fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_model_that_is_not_the_sources(finished, tmp_path):
    result = run("prune", "--k", 0.1, "--from", finished, "--model", "cnn-large", "--out", tmp_path / "out")
    assert_one_line_error(result, "holds a cnn-small model, but the config asks for cnn-large")
    assert not (tmp_path / "out").exists()


def test_plot_of_a_metric_that_is_not_a_number_per_run(tmp_path):
    from certprune.evaluation import configured_keys

    config = load_config(None, [{"loss": {"name": "gaussian", "sigma": 0.25}, "smoothing": {}, "verify": None}])
    runs.write_config(tmp_path / "run", config)
    key = configured_keys(config)["smoothing"]
    runs.write_metrics(tmp_path / "run", {"method": "dense", "sparsity": 0.0,
                                          "evaluations": {key: {"certified_acc": {"0.5": 0.4}}}})
    assert_one_line_error(run("plot", tmp_path, "--metric", "certified_acc"), "plot one radius, e.g. certified_acc_0.5")


def test_version_and_no_deprecation_noise(finished):
    from certprune import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"certprune, version {__version__}"
    assert "deprecated" not in run("verify", "--from", finished, "--max", 2).output


def test_files_are_written_with_the_umask_like_plots(finished):
    assert {oct((finished / name).stat().st_mode & 0o777) for name in ("model.pt", "metrics.json", "config.yaml")} \
        == {"0o644"}


def test_a_config_file_that_names_old_keys_still_loads_with_a_warning(tmp_path):
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**TINY, "methods": ["hydra"], "certify": None}))
    result = run("pretrain", "--config", tmp_path / "old.yaml", "--out", tmp_path / "run", "--set", "pretrain.epochs=0")
    assert result.exit_code == 0, result.output
    assert "Warning: config key 'methods' is now 'prune_methods'" in result.stderr


def test_verify_with_the_complete_stage_records_its_verdicts_per_image(finished):
    result = run("verify", "--from", finished, "--method", "IBP", "--method", "MILP", "--max", 4, "--timeout", 3)
    assert result.exit_code == 0, result.output
    (key,) = [k for k in json.loads(result.stdout) if "MILP" in k]
    record = json.loads((finished / "metrics.json").read_text())["evaluations"][key]
    assert record["verified_acc"] + record["falsified_acc"] + record["unknown_acc"] == pytest.approx(record["clean_acc"])
    assert record["decided_fraction"] == pytest.approx(1 - record["unknown_acc"])
    assert ("robust_acc_exact" in record) == (record["unknown_acc"] == 0)  # exact only when every image is decided
    lines = (finished / f"{key.replace(' ', '')}.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["index", "label", "prediction", "verified_by"] and len(lines) == 1 + 4
    assert [int(line.split("\t")[0]) for line in lines[1:]] == [0, 1, 2, 3]
