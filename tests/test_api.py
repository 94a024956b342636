"""``certprune.prune`` and ``certprune.verify``: one call each on a model in memory, over the same pipeline and
evaluation driver as the command line (the same figures), leaving the caller's model untouched."""
import contextlib
import io
import json
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import certprune
from certprune.config import ConfigError
from certprune.data import load_dataset
from helpers import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
TINY = f"npz:{ROOT / 'tests' / 'data' / 'tiny.npz'}"


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(49, 32), nn.ReLU(), nn.Linear(32, 10))


def test_the_documented_example_runs_and_prints_its_figures():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(ROOT / "examples" / "prune_and_verify.py"), run_name="__main__")
    lines = printed.getvalue().splitlines()
    assert lines[0] == "sparsity 0.900"
    clean, verified = float(lines[1].split()[-1]), float(lines[2].split()[2])
    assert 0.5 < clean and 0 < verified <= clean


def test_prune_returns_a_pruned_copy_and_the_runs_record_and_leaves_the_model_alone(tmp_path):
    model, data = small_mlp(), load_dataset(TINY)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pruned, record = certprune.prune(model, (data.train_x, data.train_y), k=0.1, loss="ibp", eps=0.05,
                                     prune={"epochs": 1}, finetune={"epochs": 1}, out=tmp_path / "run")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert type(pruned) is nn.Sequential and not pruned.training
    weights = [layer.weight for layer in pruned if isinstance(layer, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(record["sparsity"]) and record["sparsity"] == pytest.approx(0.9, abs=0.002)
    assert record["model_origin"] == {"kind": "memory", "class": "torch.nn.modules.container.Sequential"}
    assert record["method"] == "hydra" and record["k"] == 0.1 and record["dataset"] == "memory:tuple"
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    assert saved.keys() == pruned.state_dict().keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in pruned.state_dict().items())
    assert_one_line_error(run("verify", "--from", tmp_path / "run"), "memory:tuple: these images were given in memory "
                          "to the Python API; pass them again")
    with pytest.raises(certprune.runs.RunError, match="was given in memory to the Python API, so no file can rebuild "
                       "it; load model.pt's state_dict into your own module"):
        certprune.load_run(tmp_path / "run")


def test_verify_gives_the_command_lines_figures_for_the_same_model_and_images(tmp_path):
    dense = tmp_path / "dense"
    result = run("pretrain", "--dataset", TINY, "--model", f"{ROOT / 'tests' / 'data' / 'user_net.py'}:make",
                 "--loss", "ibp", "--eps", 0.02, "--set", "pretrain.epochs=2", "--set", "pretrain.lr=0.01",
                 "--set", "batch_size=32", "--set", "verify.bound_methods=[IBP,CROWN]", "--out", dense)
    assert result.exit_code == 0, result.output
    (cli,) = json.loads(dense.joinpath("metrics.json").read_text())["evaluations"].values()
    model = certprune.load_run(dense)
    api = certprune.verify(model, load_dataset(TINY), eps=0.02, methods=("IBP", "CROWN"), out=tmp_path / "api")
    figures = ("clean_acc", "verified_acc", "verified_acc_ibp", "verified_extra_crown")
    assert {key: api[key] for key in figures} == {key: cli[key] for key in figures} and api["images"] == cli["images"]
    assert (tmp_path / "api" / "verify[eps=0.02].tsv").is_file()
    pairs = torch.utils.data.TensorDataset(load_dataset(TINY).test_x, load_dataset(TINY).test_y)
    assert certprune.verify(model, pairs, eps=0.02, methods=("IBP",))["verified_acc"] == cli["verified_acc_ibp"]
    with pytest.raises(certprune.runs.RunError, match="already holds a model; verify into a new directory"):
        certprune.verify(model, load_dataset(TINY), eps=0.02, out=tmp_path / "api")


def test_bad_calls_are_one_line_errors_before_any_work(tmp_path):
    model, data = small_mlp(), load_dataset(TINY)
    with pytest.raises(ValueError, match=r"^memory:tuple: label 9 is outside the model's 5 classes$"):
        certprune.prune(nn.Sequential(nn.Flatten(), nn.Linear(49, 5)), (data.train_x, data.train_y),
                        out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^config prune.epochs must be a whole number >= 0"):
        certprune.prune(model, (data.train_x, data.train_y), prune={"epochs": -1}, out=tmp_path / "out")
    with pytest.raises(ValueError, match=r"^memory:tuple: x_test holds values in \[0, 2\], outside \[0, 1\]"):
        certprune.verify(model, (data.test_x * 2, data.test_y), out=tmp_path / "out")
    with pytest.raises(ValueError, match="^data: a certprune Dataset, a data set's name, "):
        certprune.verify(model, data.test_x, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
