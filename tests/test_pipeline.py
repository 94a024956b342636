"""Specification of runs: phases, run directories, checkpoints and resume."""
import json

import pytest
import torch

from certprune import atomic, load_run, masking, pipeline
from certprune.atomic import atomic_write_text
from certprune.evaluation import configured_record, evaluate_configured
from certprune.runs import CHECKPOINT_FILE, FORMAT, RunError, safe_load
from helpers import interrupt_training, tiny_config

RUN_FACTS = {"method", "k", "sparsity", "dataset", "model", "loss", "seed", "seconds"}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dense"
    pipeline.pretrain(tiny_config(), run_dir)
    evaluate_configured(run_dir, tiny_config())
    return run_dir


def test_pretrain_writes_a_complete_run_and_evaluation_records_what_it_covers(dense_run):
    metrics = json.loads((dense_run / "metrics.json").read_text())
    assert RUN_FACTS <= set(metrics)
    assert metrics["method"] == "dense" and metrics["k"] == 1.0 and metrics["sparsity"] == 0.0
    record = configured_record(metrics, tiny_config(), "verify")
    assert list(metrics["evaluations"]) == ["verify[max=64, eps=0.05, bound_methods=IBP+CROWN-IBP]"]
    assert record["verified_acc"] <= record["clean_acc"]
    assert record["images"] == {"set": "test", "count": 64, "of": 1500, "skip": 1, "first": 0, "last": 63}
    assert record["settings"]["eps"] == 0.05 and record["settings"]["bound_methods"] == ["IBP", "CROWN-IBP"]
    assert (dense_run / "config.yaml").exists() and (dense_run / "history.csv").exists()
    assert not (dense_run / CHECKPOINT_FILE).exists()
    assert (dense_run / "history.csv").read_text().count("\npretrain,") == 2


def test_model_file_loads_with_weights_only(dense_run):
    data = torch.load(dense_run / "model.pt", weights_only=True)
    assert data["format"] == FORMAT and data["architecture"]["name"] == "cnn-small"


def test_load_run_returns_a_plain_eval_module_on_pixels(dense_run):
    model = load_run(dense_run)
    assert not model.training and not any(masking.is_masked(m) for m in model.modules())
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("method", ["hydra", "lwm"])
def test_pruned_weights_are_zero_in_model_file_and_after_load_run(dense_run, tmp_path, method):
    k = 0.1
    metrics = pipeline.prune(tiny_config(), tmp_path / method, k, method, dense_run)
    model = load_run(tmp_path / method)
    for _, layer in masking.prunable_layers(model):
        assert int((layer.weight != 0).sum()) <= masking.num_kept(k, layer.weight.numel())
    state = torch.load(tmp_path / method / "model.pt", weights_only=True)["state_dict"]
    assert sum(int((state[f"{i}.weight"] == 0).sum()) for i in (1, 3, 6, 8)) == round(
        metrics["sparsity"] * sum(state[f"{i}.weight"].numel() for i in (1, 3, 6, 8)))
    expected_zeros = sum(layer.weight.numel() - masking.num_kept(k, layer.weight.numel())
                         for _, layer in masking.prunable_layers(model))
    assert metrics["sparsity"] == pytest.approx(expected_zeros / sum(l.weight.numel() for _, l in masking.prunable_layers(model)), abs=1e-4)
    assert metrics["method"] == method and metrics["k"] == k and RUN_FACTS <= set(metrics)


def test_lwm_gets_the_same_total_epochs_as_hydra(dense_run, tmp_path):
    config = tiny_config(prune={"epochs": 2}, finetune={"epochs": 1})
    pipeline.prune(config, tmp_path / "hydra", 0.1, "hydra", dense_run)
    pipeline.prune(config, tmp_path / "lwm", 0.1, "lwm", dense_run)
    hydra = (tmp_path / "hydra" / "history.csv").read_text().splitlines()[1:]
    lwm = (tmp_path / "lwm" / "history.csv").read_text().splitlines()[1:]
    assert len(hydra) == len(lwm) == 3
    assert [row.split(",")[0] for row in hydra] == ["prune", "prune", "finetune"]


def test_hydra_without_finetuning_keeps_pretrained_weights_exactly(dense_run, tmp_path):
    """Score training never moves a weight: every kept weight equals the pretrained one."""
    pipeline.prune(tiny_config(finetune={"epochs": 0}), tmp_path / "scores-only", 0.1, "hydra", dense_run)
    dense, pruned = load_run(dense_run), load_run(tmp_path / "scores-only")
    for (_, before), (_, after) in zip(masking.prunable_layers(dense), masking.prunable_layers(pruned)):
        kept = after.weight != 0
        assert torch.equal(after.weight[kept], before.weight[kept])
        assert torch.equal(after.bias, before.bias)


def test_interrupted_run_resumes_from_its_last_epoch_and_ends_identically(tmp_path, monkeypatch):
    config = tiny_config(pretrain={"epochs": 3, "loss": {"ramp_epochs": 2}})
    pipeline.pretrain(config, tmp_path / "straight")

    interrupt_training(monkeypatch, at_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.pretrain(config, tmp_path / "resumed")
    monkeypatch.undo()
    checkpoint = safe_load(tmp_path / "resumed" / CHECKPOINT_FILE)
    assert checkpoint["epoch"] == 1 and not (tmp_path / "resumed" / "model.pt").exists()

    with pytest.raises(RunError, match="--resume"):
        pipeline.pretrain(config, tmp_path / "resumed")
    pipeline.pretrain(config, tmp_path / "resumed", resume=True)
    history = (tmp_path / "resumed" / "history.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in history[1:]] == ["1", "2", "3"]
    straight, resumed = load_run(tmp_path / "straight"), load_run(tmp_path / "resumed")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_of_a_finished_run_changes_nothing(dense_run):
    before = (dense_run / "model.pt").read_bytes()
    pipeline.pretrain(tiny_config(), dense_run, resume=True)
    assert (dense_run / "model.pt").read_bytes() == before


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def disk_full(stream):
        stream.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic._atomic(target, disk_full)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoints_are_loaded_with_weights_only(dense_run, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_run(dense_run)
    assert calls == [True]


def test_a_phase_that_ends_at_chance_says_so_and_one_that_learns_does_not(tmp_path, caplog):
    """A collapsed phase (here Adam at lr 1 kills every ReLU: one class for every image) is named in a warning when
    it ends, not found later in a table of 10 % figures."""
    with caplog.at_level("WARNING", logger="certprune"):
        pipeline.pretrain(tiny_config(pretrain={"epochs": 2, "lr": 1.0}), tmp_path / "collapsed")
    assert "pretrain ended at" in caplog.text and "near chance for 10 classes" in caplog.text
    assert "a natural epoch before the eps ramp" in caplog.text  # the pretraining advice, not the pruning one
    caplog.clear()
    with caplog.at_level("WARNING", logger="certprune"):
        natural = {"name": "ibp", "eps": 0.05, "kappa_end": 1.0}  # 39 % after 3 epochs
        pipeline.pretrain(tiny_config(pretrain={"epochs": 3, "lr": 0.003}, loss=natural), tmp_path / "learned")
    assert "chance" not in caplog.text
