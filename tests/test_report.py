"""Specification of a sweep's report beside its certificates: verified, exact and attacked accuracy side by side in
results.md, and the band in robustness.png where the true robust accuracy must lie."""
import json

import pytest

from certprune.evaluation import configured_keys
from certprune.plots import band, ladder_points
from certprune.report import with_ladder, with_records, write_report
from certprune.sweep import sweep
from helpers import tiny_config

CONFIG = tiny_config(k=[0.1], prune_methods=["hydra", "lwm"], verify={"bound_methods": ["IBP", "MILP"]},
                     attack={"steps": 5}, autoattack={})


PGD = {"norm": "linf", "eps": 0.05, "steps": 5, "restarts": 1, "seed": 0}
AUTOATTACK = {"norm": "linf", "eps": 0.05, "version": "standard", "seed": 0}


def run_metrics(method, k, seed, verified, exact, pgd, autoattack):
    keys = configured_keys(CONFIG)
    images = {"set": "test", "count": 64, "of": 1500, "skip": 1, "first": 0, "last": 63}
    verify = {"images": images, "settings": {"bound_methods": ["IBP", "MILP"], "eps": 0.05}, "clean_acc": 0.9,
              "verified_acc": verified, **({"robust_acc_exact": exact} if exact is not None else {})}
    return {"run": f"{method}-k{k}", "method": method, "k": k, "sparsity": 1 - k, "seed": seed, "seconds": 1.0,
            "evaluations": {keys["verify"]: verify,
                            keys["attack"]: {"images": images, "settings": PGD, "clean_acc": 0.9, "pgd_acc": pgd},
                            keys["autoattack"]: {"images": images, "settings": AUTOATTACK, "clean_acc": 0.9,
                                                 "autoattack_acc": autoattack}}}


ROWS = [run_metrics("dense", 1.0, 0, 0.80, 0.82, 0.86, 0.84),
        run_metrics("hydra", 0.1, 0, 0.70, None, 0.78, 0.75),
        run_metrics("hydra", 0.1, 1, 0.72, None, 0.76, 0.77),
        run_metrics("lwm", 0.1, 0, 0.60, 0.61, 0.70, 0.66)]


def test_results_show_verified_exact_pgd_and_autoattack_side_by_side(tmp_path):
    write_report(ROWS, tmp_path, CONFIG)
    text = (tmp_path / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert header.split(" | ")[5:9] == ["verified_acc", "robust_acc_exact", "autoattack_acc", "pgd_acc"]
    assert "| lwm-k0.1 | lwm | 0.1 | 90.0 | 90.0 | 60.0 | 61.0 | 66.0 | 70.0 |" in text
    assert "| hydra | layerwise | 0.1 | 2 | 90.0 ± 0.0 | 90.0 ± 0.0 | 71.0 ± 1.4 |  | 76.0 ± 1.4 | 77.0 ± 1.4 |" in text

    assert "- `attack`: PGD-5 (linf, eps 0.05, step auto, 1 restart(s), each run's seed); 64 of 1500 test images." in text
    assert "- `autoattack`: AutoAttack standard (linf, eps 0.05, each run's seed); 64 of 1500 test images." in text
    seeded = CONFIG.model_copy(update={"attack": CONFIG.attack.model_copy(update={"seed": 0})})
    old_key, new_key = configured_keys(CONFIG)["attack"], configured_keys(seeded)["attack"]
    rows = [{**row, "evaluations": {new_key if key == old_key else key: value
                                    for key, value in row["evaluations"].items()}} for row in ROWS]
    write_report(rows, tmp_path, seeded)  # an attack seeded on its own: every run's record names that seed
    assert "1 restart(s), seed 0); 64 of 1500" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "robustness.png").stat().st_size > 10_000


def test_the_band_runs_from_the_verified_figure_to_the_strongest_attack():
    lines = ladder_points(with_ladder(with_records(ROWS, CONFIG)), "hydra")
    assert lines["verified_acc"] == {0.0: pytest.approx(80.0), 90.0: pytest.approx(71.0)}  # dense, mean of 2 seeds
    assert band(lines) == [(0.0, pytest.approx(80.0), pytest.approx(84.0)),  # AutoAttack below PGD on dense
                           (90.0, pytest.approx(71.0), pytest.approx(76.0))]  # and on HYDRA's mean
    assert "robust_acc_exact" in lines and 90.0 not in lines["robust_acc_exact"]  # HYDRA's MILP left some unknown


def test_a_sweep_with_verified_accuracy_alone_draws_no_ladder(tmp_path):
    config = tiny_config(k=[0.1], prune_methods=["hydra"])
    rows = [{**row, "evaluations": {configured_keys(config)["verify"]: next(
        r for key, r in row["evaluations"].items() if key.startswith("verify"))}} for row in ROWS[1:3]]
    write_report(rows, tmp_path, config)
    assert not (tmp_path / "robustness.png").exists()
    assert "pgd_acc" not in (tmp_path / "results.md").read_text()


def test_hydra_is_compared_with_lwm_paired_by_seed_under_its_allocation_and_against_the_best_lwm(tmp_path):
    def pruned(method, allocation, seed, verified):
        return {**run_metrics(method, 0.01, seed, verified, None, 0.9, 0.9), "allocation": allocation}

    rows = [pruned("hydra", "learned", 0, 0.80), pruned("hydra", "learned", 1, 0.84),
            pruned("lwm", "learned", 0, 0.70), pruned("lwm", "learned", 1, 0.72),
            pruned("lwm", "global", 0, 0.83), pruned("lwm", "global", 1, 0.81)]
    write_report(rows, tmp_path, CONFIG.model_copy(update={"allocations": ["learned", "global"]}))
    text = (tmp_path / "results.md").read_text()
    # per seed: 0.80 - 0.70, 0.84 - 0.72 against the same allocation; 0.80 - 0.83, 0.84 - 0.81 against global LWM
    assert "| learned | 0.01 | +11.0 ± 1.4 | 2 | +0.0 ± 4.2 | global | 2 |" in text
    assert "allocation learned, global (LWM under learned is ERK" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(row["method"], row["allocation"]): row["n"] for row in summary} == {
        ("hydra", "learned"): 2, ("lwm", "learned"): 2, ("lwm", "global"): 2}


def test_a_sweep_over_allocations_prunes_each_from_the_same_dense_model(tmp_path):
    config = tiny_config(allocations=["layerwise", "erk"], prune_methods=["lwm"], k=[0.05], pretrain={"epochs": 1},
                         prune={"epochs": 0}, finetune={"epochs": 0}, verify={"max": 8, "bound_methods": ["IBP"]})
    rows = sweep(config, tmp_path)
    assert [row["run"] for row in rows] == ["dense", "lwm-layerwise-k0.05", "lwm-erk-k0.05"]
    assert [row.get("allocation") for row in rows[1:]] == ["layerwise", "erk"]
    assert rows[1]["kept_per_layer"] != rows[2]["kept_per_layer"]
    assert {row["source"] for row in rows[1:]} == {str(tmp_path / "dense")}
    assert {(row["allocation"], row["k"]) for row in json.loads((tmp_path / "summary.json").read_text())} == {
        (None, 1.0), ("layerwise", 0.05), ("erk", 0.05)}


def test_a_channel_sweep_shows_parameters_and_flops_of_the_compact_networks(tmp_path):
    config = tiny_config(k=[0.5], prune_methods=["lwm"], prune={"epochs": 0, "granularity": "channel"},
                         finetune={"epochs": 0}, pretrain={"epochs": 1}, verify={"max": 8, "bound_methods": ["IBP"]})
    rows = sweep(config, tmp_path)
    dense, pruned = rows
    assert pruned["flops"] < 0.5 * dense["flops"] and pruned["params"] < 0.5 * dense["params"]  # half the channels
    text = (tmp_path / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run")).split(" | ")
    assert "params" in header and "mflops" in header
    cells = next(line for line in text.splitlines() if line.startswith("| lwm-k0.5")).split(" | ")
    assert cells[header.index("params")] == str(pruned["params"])
    assert float(cells[header.index("mflops")]) == pytest.approx(pruned["flops"] / 1e6, rel=1e-3)
    for batch in (1, 256):  # measured, so only its presence and sign are specified
        measured = pruned[f"latency_b{batch}_ms"]
        assert measured > 0 and float(cells[header.index(f"latency_b{batch}_ms")]) == pytest.approx(measured, abs=0.01)
    assert "latency the fastest of 20 forward passes" in text
    assert (tmp_path / "flops.png").exists()


def test_a_mean_over_fewer_seeds_than_the_row_has_says_how_many(tmp_path):
    rows = [*ROWS[1:3], {**run_metrics("hydra", 0.1, 2, 0.74, 0.75, 0.8, 0.8)}]  # only seed 2 decided every image
    write_report(rows, tmp_path, CONFIG)
    assert "| hydra | layerwise | 0.1 | 3 | 90.0 ± 0.0 | 90.0 ± 0.0 | 72.0 ± 2.0 | 75.0 (n = 1) |" in (
        tmp_path / "results.md").read_text()


def test_the_header_names_the_seeds_the_runs_were_trained_with_not_the_configs_single_seed(tmp_path):
    write_report(ROWS, tmp_path, CONFIG)  # CONFIG.seed is 0; the rows hold seeds 0 and 1
    header = (tmp_path / "results.md").read_text().split("\n\n")[1]
    assert header.endswith("seeds 0, 1.") and "seed 0." not in header
    write_report(ROWS[:2], tmp_path, CONFIG)
    assert (tmp_path / "results.md").read_text().split("\n\n")[1].endswith("; seed 0.")


def test_the_header_names_each_pruning_setting_that_differs_and_what_lwm_under_learned_is(tmp_path):
    config = CONFIG.model_copy(update={"allocations": ["learned"], "weight_init": "ibp"})
    write_report(ROWS, tmp_path, config)
    header = (tmp_path / "results.md").read_text().split("\n\n")[1]
    assert "allocation learned (LWM under learned is ERK" in header and "dense weights initialised ibp" in header
    channel = CONFIG.model_copy(update={"prune": CONFIG.prune.model_copy(update={
        "granularity": "channel", "channel_scores": "weight-l1"})})
    write_report(ROWS, tmp_path, channel)
    header = (tmp_path / "results.md").read_text().split("\n\n")[1]
    assert "granularity channel, HYDRA's channel scores weight-l1" in header and "ERK" not in header


def test_runs_that_predict_one_class_for_every_image_are_named_under_the_table(tmp_path):
    collapsed = run_metrics("lwm", 0.1, 1, 0.10, 0.10, 0.10, 0.10)
    collapsed["evaluations"][configured_keys(CONFIG)["verify"]]["predicted_classes"] = 1
    healthy = [{**row, "evaluations": {**row["evaluations"]}} for row in ROWS]
    for row in healthy:
        row["evaluations"][configured_keys(CONFIG)["verify"]] = {
            **row["evaluations"][configured_keys(CONFIG)["verify"]], "predicted_classes": 10}
    write_report([*healthy, {**collapsed, "run": "lwm-k0.1-s1"}], tmp_path, CONFIG)
    text = (tmp_path / "results.md").read_text()
    assert "Constant output: lwm-k0.1-s1 predict(s) one class for every one of the evaluated images" in text
    assert text.count("Constant output") == 1 and "the means above include them" in text
    few = collapsed["evaluations"][configured_keys(CONFIG)["verify"]]
    few["images"] = {**few["images"], "count": 10}  # one class for 10 images may be chance, not a collapse
    write_report([*healthy, {**collapsed, "run": "lwm-k0.1-s1"}], tmp_path, CONFIG)
    assert "Constant output" not in (tmp_path / "results.md").read_text()
    write_report(healthy, tmp_path, CONFIG)
    assert "Constant output" not in (tmp_path / "results.md").read_text()
