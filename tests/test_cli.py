"""The command line end to end on a tiny config, and its answers to bad input: one line, non-zero exit."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from certprune.models import create_model
from certprune.runs import FORMAT
from helpers import TINY, assert_one_line_error, record_of, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = run("sweep", "--config", config, "--out", root / "sweep")
    assert result.exit_code == 0, result.output
    return root / "sweep"


def test_sweep_writes_runs_table_and_plot(sweep_dir):
    assert {p.name for p in sweep_dir.iterdir()} >= {"dense", "hydra-k0.1", "lwm-k0.1", "results.md", "sparsity.png"}
    table = (sweep_dir / "results.md").read_text()
    assert "| hydra-k0.1 | hydra | 0.1 | 90.0 |" in table and "| lwm-k0.1 | lwm | 0.1 | 90.0 |" in table
    assert (sweep_dir / "sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_again_reuses_finished_runs(sweep_dir):
    before = (sweep_dir / "hydra-k0.1" / "model.pt").stat().st_mtime_ns
    config = sweep_dir.parent / "tiny.yaml"
    assert run("sweep", "--config", config, "--out", sweep_dir).exit_code == 0
    assert (sweep_dir / "hydra-k0.1" / "model.pt").stat().st_mtime_ns == before


def test_verify_on_a_subset_records_beside_the_runs_own_figures_never_over_them(sweep_dir):
    path = sweep_dir / "hydra-k0.1" / "metrics.json"
    (own,) = json.loads(path.read_text())["evaluations"].values()
    result = run("verify", "--from", sweep_dir / "hydra-k0.1", "--eps", 0.01, "--method", "ibp", "--max", 32)
    assert result.exit_code == 0, result.output
    evaluations = json.loads(path.read_text())["evaluations"]
    assert evaluations["verify[max=64, eps=0.05, bound_methods=IBP+CROWN-IBP]"] == own  # untouched: 64 images
    subset = evaluations["verify[max=32, eps=0.01, bound_methods=IBP]"]
    assert subset["images"]["count"] == 32 and subset["settings"]["eps"] == 0.01
    assert subset["verified_acc"] <= subset["clean_acc"]
    table = (sweep_dir / "results.md").read_text()
    assert "64 of 1500 test images" in table and "eps 0.05" in table


def test_plot_draws_a_png(sweep_dir, tmp_path):
    result = run("plot", sweep_dir, "--out", tmp_path / "plot.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_one_liner_with_from(sweep_dir, tmp_path):
    result = run("prune", "--loss", "ibp", "--eps", 0.05, "--k", 0.05, "--from", sweep_dir / "dense", "--out",
                 tmp_path / "run", "--set", "train_examples=128", "--set", "prune.epochs=1",
                 "--set", "finetune.epochs=1", "--set", "verify.max_examples=16")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "hydra" and metrics["k"] == 0.05 and metrics["sparsity"] > 0.94
    assert record_of(metrics, "verify")["images"]["count"] == 16


@pytest.mark.parametrize("k", ["0", "1.5", "-0.1", "nan", "abc"])
def test_bad_k(sweep_dir, tmp_path, k):
    result = run("prune", "--k", k, "--from", sweep_dir / "dense", "--out", tmp_path / "run")
    assert_one_line_error(result, "k must be")
    assert not (tmp_path / "run").exists()


def test_missing_from(tmp_path):
    assert_one_line_error(run("prune", "--k", 0.1, "--from", tmp_path / "nowhere"), "no trained model")


def test_corrupted_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint at all")
    assert_one_line_error(run("prune", "--k", 0.1, "--from", tmp_path), "damaged or not a checkpoint")


def test_foreign_checkpoint(tmp_path):
    torch.save({"model": create_model("cnn-small").state_dict()}, tmp_path / "model.pt")
    assert_one_line_error(run("prune", "--k", 0.1, "--from", tmp_path), "not a certprune checkpoint")


def test_checkpoint_of_another_architecture(tmp_path):
    architecture = {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    state = create_model("cnn-large").state_dict()
    torch.save({"format": FORMAT, "architecture": architecture, "state_dict": state}, tmp_path / "model.pt")
    assert_one_line_error(run("prune", "--k", 0.1, "--from", tmp_path), "does not fit this architecture")


@pytest.mark.parametrize("flag, value, fragment", [("--loss", "hinge", "unknown loss"),
                                                   ("--model", "resnet-9000", "unknown model"),
                                                   ("--dataset", "imagenet", "unknown dataset")])
def test_unknown_names(tmp_path, flag, value, fragment):
    result = run("pretrain", flag, value, "--out", tmp_path / "run", "--set", "pretrain.epochs=1")
    assert_one_line_error(result, fragment)


def test_dataset_path_that_is_not_there(tmp_path):
    result = run("pretrain", "--dataset", "mnist", "--data-dir", tmp_path / "missing", "--out", tmp_path / "run")
    assert_one_line_error(result, "does not exist")


def test_bad_config_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("prune: {epochs: 1, colour: red}\n")
    assert_one_line_error(run("pretrain", "--config", tmp_path / "bad.yaml"), "unknown config key prune.colour")
    assert_one_line_error(run("pretrain", "--config", tmp_path / "none.yaml"), "does not exist")


def test_existing_run_is_never_overwritten(sweep_dir):
    assert_one_line_error(run("pretrain", "--out", sweep_dir / "dense", "--set", "pretrain.epochs=1"), "--resume")


@pytest.mark.parametrize("name", sorted(p.relative_to(ROOT / "configs").as_posix()
                                        for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_is_valid_and_its_report_metric_is_one_its_evaluations_give(name):
    from certprune.config import load_config
    from certprune.evaluation import reportable

    config = load_config(ROOT / "configs" / name)
    assert config.report_metric in reportable(config)
