"""Runs you can trust: the bare headline command learns, a resumed run is the same run, a sweep never reuses
another setting's run, and a diverging loss stops at once with the last good checkpoint kept."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from certprune import pipeline
from certprune.config import load_config
from certprune.evaluation import evaluate_configured
from certprune.runs import CHECKPOINT_FILE, read_metrics, safe_load
from certprune.train import TrainingDiverged
from helpers import TINY, assert_one_line_error, interrupt_training, record_of, run, tiny_config


def test_the_bare_headline_command_trains_far_above_chance(tmp_path, monkeypatch):
    """``certprune prune --loss crown-ibp --k 0.05`` from a fresh directory, on a shortened schedule: with no eps
    ramp the defaults sat at ln 10 and 11 % accuracy."""
    monkeypatch.chdir(tmp_path)
    result = run("prune", "--loss", "crown-ibp", "--k", 0.05, "--set", "pretrain.epochs=4", "--set", "batch_size=32",
                 "--set", "prune.epochs=1", "--set", "finetune.epochs=1", "--set", "train_examples=1536",
                 "--set", "verify.max=300", "--set", "verify.bound_methods=[IBP]")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "runs" / "hydra-crown-ibp-k0.05" / "metrics.json").read_text())
    verify = record_of(record, "verify")
    assert verify["clean_acc"] > 0.3 and verify["verified_acc"] > 0.15  # chance is 0.1 and 0.0
    assert (tmp_path / "runs" / "cache").is_dir()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trust") / "dense"
    pipeline.pretrain(tiny_config(verify=None), run_dir)
    return run_dir


def test_resume_takes_the_runs_own_settings_and_refuses_others(dense, tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "verify": None, "prune": {"epochs": 1},
                                                        "finetune": {"epochs": 1}}))
    out = tmp_path / "lwm-k0.01"
    interrupt_training(monkeypatch)
    result = run("prune", "--method", "lwm", "--k", 0.01, "--from", dense, "--config", tmp_path / "tiny.yaml",
                 "--out", out)
    assert result.exit_code == 130 and "rerun with --resume" in result.output
    monkeypatch.undo()
    config_before = (out / "config.yaml").read_bytes()
    assert_one_line_error(run("prune", "--resume", "--out", out, "--k", 0.5), "k 0.01 -> 0.5")
    assert_one_line_error(run("prune", "--resume", "--out", out, "--method", "hydra"), "method lwm -> hydra")
    assert_one_line_error(run("prune", "--resume", "--out", out, "--set", "loss.eps=0.3"), "loss.eps 0.05 -> 0.3")
    result = run("prune", "--resume", "--out", out)  # the README's line: no --method, no --k
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lwm" and metrics["k"] == 0.01 and metrics["sparsity"] > 0.98
    assert (out / "config.yaml").read_bytes() == config_before
    history = (out / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in history] == [["finetune", "1"], ["finetune", "2"]]


def test_a_sweep_never_reuses_runs_trained_with_other_settings(dense, tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "prune": {"epochs": 0}, "finetune": {"epochs": 1},
                                                        "prune_methods": ["lwm"], "verify": {"max": 16}}))
    first = run("sweep", "--config", tmp_path / "tiny.yaml", "--out", tmp_path / "sweep", "--from", dense)
    assert first.exit_code == 0, first.output
    assert "training lwm-k0.1 (2 of 2)" in first.stderr
    table = (tmp_path / "sweep" / "results.md").read_text()
    result = run("sweep", "--config", tmp_path / "tiny.yaml", "--out", tmp_path / "sweep", "--from", dense,
                 "--set", "loss.eps=0.3")
    assert_one_line_error(result, "was trained with other settings (loss.eps 0.05 -> 0.3)")
    assert (tmp_path / "sweep" / "results.md").read_text() == table
    # evaluation settings are not training settings: the finished run is evaluated again, not retrained
    model = (tmp_path / "sweep" / "lwm-k0.1" / "model.pt").read_bytes()
    again = run("sweep", "--config", tmp_path / "tiny.yaml", "--out", tmp_path / "sweep", "--from", dense,
                "--set", "verify.max=8")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "sweep" / "lwm-k0.1" / "model.pt").read_bytes() == model
    assert "8 of 1500 test images" in (tmp_path / "sweep" / "results.md").read_text()


def test_a_loss_that_stops_being_finite_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from certprune.losses import NaturalLoss

    calls = []

    def sometimes_nan(self, model, x, y, epoch):
        calls.append(epoch)
        loss, metrics = real_call(self, model, x, y, epoch)
        return (loss * float("nan") if epoch >= 1 else loss), metrics

    real_call = NaturalLoss.__call__
    monkeypatch.setattr(NaturalLoss, "__call__", sometimes_nan)
    config = load_config(None, [{"loss": {"name": "natural"}, "pretrain": {"epochs": 3}, "train_examples": 256,
                                 "batch_size": 64, "verify": None}])
    with pytest.raises(TrainingDiverged, match="the loss became nan in epoch 2, batch 1"):
        pipeline.pretrain(config, tmp_path / "run")
    assert safe_load(tmp_path / "run" / CHECKPOINT_FILE)["epoch"] == 0  # the first, finite epoch
    assert not (tmp_path / "run" / "model.pt").exists()
    assert calls[-1] == 1.0  # stopped at the first non-finite batch
    good = safe_load(tmp_path / "run" / CHECKPOINT_FILE)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in good.values())


@pytest.mark.parametrize("command, message", [
    (["verify", "--from", "{run}"], "decided images are kept in the run's verify TSV (rerun the same command"),
    (["evaluate", "--from", "{run}"], "interrupted; nothing was recorded"),
    (["sweep", "--out", "{tmp}/sweep", "--from", "{run}", "--set", "k=[0.5]", "--set", "verify=null",
      "--set", "report_metric=sparsity"],
     "rerun the same sweep command"),
])
def test_ctrl_c_says_what_was_kept_for_each_command(dense, tmp_path, monkeypatch, command, message):
    from certprune import evaluation, sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_run", interrupted)
    monkeypatch.setattr(sweep, "prune", interrupted)
    result = run(*[part.format(run=dense, tmp=tmp_path) for part in command])
    assert result.exit_code == 130 and message in result.output and "--resume" not in result.output


def test_a_sweep_over_seeds_reports_mean_and_spread_of_each_method_and_k(tmp_path):
    from certprune.sweep import sweep

    config = tiny_config(seeds=[0, 1], prune_methods=["lwm"], pretrain={"epochs": 1}, prune={"epochs": 0},
                         finetune={"epochs": 1}, verify={"max": 16, "bound_methods": ["IBP"]})
    rows = sweep(config, tmp_path)
    assert [row["run"] for row in rows] == ["dense-s0", "lwm-k0.1-s0", "dense-s1", "lwm-k0.1-s1"]
    assert [row["seed"] for row in rows] == [0, 0, 1, 1]
    by_seed = [record_of(row, "verify")["verified_acc"] for row in rows if row["method"] == "lwm"]
    table = (tmp_path / "results.md").read_text()
    assert "Mean ± sample standard deviation over seeds 0, 1" in table
    mean, spread = sum(by_seed) / 2, abs(by_seed[0] - by_seed[1]) / 2 ** 0.5
    assert "| lwm | layerwise | 0.1 | 2 |" in table and f"{100 * mean:.1f} ± {100 * spread:.1f}" in table
    assert (tmp_path / "sparsity.png").exists()
    summary = {(row["method"], row["k"]): row for row in json.loads((tmp_path / "summary.json").read_text())}
    lwm = summary[("lwm", 0.1)]
    assert lwm["values"] == by_seed and lwm["seeds"] == [0, 1] and lwm["n"] == 2 and lwm["allocation"] == "layerwise"
    assert lwm["mean"] == pytest.approx(mean) and lwm["sd"] == pytest.approx(spread) and lwm["metric"] == "verified_acc"


def test_the_same_prune_twice_gives_the_same_model_and_figures(dense, tmp_path):
    config = tiny_config(verify={"max": 16, "bound_methods": ["IBP"]}, prune={"epochs": 1}, finetune={"epochs": 1})
    for name in ("a", "b"):
        pipeline.prune(config, tmp_path / name, 0.1, "hydra", dense)
        evaluate_configured(tmp_path / name, config)
    first, second = (torch.load(tmp_path / n / "model.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(first[key], second[key]) for key in first)
    figures = [{key: value for key, value in read_metrics(tmp_path / n).items() if key not in ("seconds", "source")}
               for n in "ab"]
    for record in (figures[0]["evaluations"], figures[1]["evaluations"]):
        for made in record.values():
            for timing in [key for key in made if key.startswith("seconds")]:
                made.pop(timing)
    assert figures[0] == figures[1]
    assert torch.are_deterministic_algorithms_enabled()  # what the runs asked torch for
    assert figures[0]["torch_threads"] == torch.get_num_threads()  # and the settings that still move figures:
    assert figures[0]["code"]["torch"] == torch.__version__  # the torch and the certprune code that computed them
    checkout = subprocess.run(["git", "-C", str(Path(pipeline.__file__).parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
    if checkout.returncode == 0:  # a git checkout (CI's clean clone is one): its commit, marked if edited
        assert figures[0]["code"]["commit"].split("+")[0] == checkout.stdout.strip()


@pytest.mark.parametrize("seeds, fragment", [("[]", "seeds: List should have at least 1 item"),
                                             ("[0.5]", "seeds.0: Input should be a valid integer"),
                                             ("[x]", "seeds.0: Input should be a valid integer")])
def test_bad_seeds_are_one_line(tmp_path, seeds, fragment):
    assert_one_line_error(run("sweep", "--out", tmp_path / "out", "--set", f"seeds={seeds}"), fragment)
    assert not (tmp_path / "out").exists()


def test_the_report_shows_fractions_in_percent_and_other_figures_as_they_are():
    from certprune.report import _fmt

    assert _fmt("verified_acc", 0.5) == "50.0" and _fmt("certified_acc_0.25", 0.25) == "25.0"
    assert _fmt("sparsity", 0.99) == "99.0" and _fmt("abstain_rate", 0.1) == "10.0"
    assert _fmt("verified_extra_crown", 0.02467) == "2.5" and _fmt("decided_fraction", 0.9) == "90.0"
    assert _fmt("acr", 0.42) == "0.42" and _fmt("seconds", 12.6) == "13" and _fmt("k", 0.05) == "0.05"
