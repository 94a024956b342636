"""Multi-process runs on CPU with gloo and 2 processes, and the device option.

Sharded certify / verify / evaluate give the single-process per-example results; DDP training keeps the masks
identical on every rank and writes one run directory; ``--device cuda`` without a GPU is a one-line error.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from certprune import distributed, masking
from certprune.attacks import PGD
from certprune.certify.attack import attack_examples
from certprune.certify.smoothing_run import TSV_FILE, certify_run
from certprune.certify.verify import verify_examples
from certprune.config import SmoothingConfig
from certprune.devices import resolve_device
from certprune.pipeline import load_data, pretrain, train_phases
from certprune.runs import load_model_file
from helpers import TINY, assert_one_line_error, record_of, run, tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
CONFIG = {**TINY, "pretrain": {"epochs": 1, "lr": 0.002}, "verify": {"max": 32, "bound_methods": ["IBP"]}}
IMAGES = 40  # test images for the sharded evaluations: 5 batches of 8, so the two ranks get unequal shares


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _evaluate_and_train(root: Path, out: Path) -> dict:
    """What every process runs (a single one, or each rank of a group): the three sharded evaluations on the
    dense run at ``root/dense``, and a HYDRA score + fine-tune training of it into ``out/train``."""
    model, architecture = load_model_file(root / "dense" / "model.pt")
    config = tiny_config(**CONFIG)
    data = load_data(config)
    x, y = data.test_x[:IMAGES], data.test_y[:IMAGES]
    correct, proven = verify_examples(model, x, y, 0.02, ["IBP", "CROWN-IBP"], batch_size=8)
    clean, robust = attack_examples(model, x, y, PGD(0.1, "linf", steps=3, restarts=2), batch_size=8, seed=3)
    settings = SmoothingConfig(sigma=0.25, n0=16, n=64, batch=32, max=7)
    summary = certify_run(model, x, y, out / "certify", settings, seed=5, progress=False)
    rows = [line.split("\t")[:5] for line in (out / "certify" / TSV_FILE).read_text().splitlines()]

    masking.apply_masks(model, 0.1)
    train_phases(model, [("prune", config.prune), ("finetune", config.finetune)], config, data, out / "train",
                 None, architecture)
    masks = [masking.mask_of(layer).mask() for _, layer in masking.masked_layers(model)]
    return {"verify": (correct, proven), "attack": (clean, robust), "certify": (rows, summary), "masks": masks,
            "scores": [s.detach().clone() for s in masking.scores(model)]}


def _rank_main(rank: int, world: int, port: int, root: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup(resolve_device("cpu"))
    assert distributed.world_size() == world and distributed.rank() == rank
    try:
        (root / "group").mkdir(exist_ok=True)
        (root / "group" / "run").mkdir(exist_ok=True)
        torch.save(_evaluate_and_train(root, root / "group" / "run"), root / "group" / f"rank{rank}.pt")
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The dense run, then the single-process results and those of each rank of a 2-process gloo group."""
    root = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as in the workers
    try:
        pretrain(tiny_config(**CONFIG), root / "dense")
        torch.manual_seed(0)
        single = _evaluate_and_train(root, root / "single")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_rank_main, args=(2, _free_port(), root), nprocs=2, join=True)
    ranks = [torch.load(root / "group" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return root, single, ranks


def test_sharded_verify_and_attack_equal_one_process_example_by_example(results):
    _, single, ranks = results
    for rank in ranks:  # every rank ends with the whole merged result
        correct, proven = rank["verify"]
        assert torch.equal(correct, single["verify"][0]) and proven.keys() == single["verify"][1].keys()
        assert all(torch.equal(proven[m], single["verify"][1][m]) for m in proven)
        assert all(torch.equal(a, b) for a, b in zip(rank["attack"], single["attack"]))
    assert single["verify"][0].sum() > 0 and single["attack"][0].shape == (IMAGES,)


def test_sharded_certify_merges_into_the_one_process_certify_tsv(results):
    root, single, ranks = results
    rows, summary = single["certify"]
    assert len(rows) == 1 + 7 and rows[1][0] == "0"
    timings = ("certify_seconds", "seconds_per_image")
    for rank in ranks:
        assert rank["certify"][0] == rows  # index, label, prediction, radius, correct: identical, in index order
        merged = {k: v for k, v in rank["certify"][1].items() if k not in timings}
        assert merged == {k: v for k, v in summary.items() if k not in timings}
    assert sorted(p.name for p in (root / "group" / "run" / "certify").iterdir()) == ["certify.json", TSV_FILE]


def test_ddp_training_keeps_masks_identical_on_every_rank(results):
    root, single, ranks = results
    for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["scores"], ranks[1]["scores"]):
        assert torch.equal(a, b)
    # the global batch is shared out and DDP averages the gradients: the single-process training, up to rounding
    for a, b in zip(ranks[0]["scores"], single["scores"]):
        assert torch.allclose(a, b, atol=1e-4)
    assert sorted(p.name for p in (root / "group" / "run" / "train").iterdir()) == ["checkpoint.pt", "history.csv"]


def test_torchrun_prune_writes_one_run_directory(results, tmp_path):
    root, _, _ = results
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "certprune",
               "prune", "--k", "0.1", "--from", str(root / "dense"), "--config", str(tmp_path / "tiny.yaml"),
               "--out", str(tmp_path / "run"), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock", "config.yaml", "history.csv", "metrics.json", "model.pt", "run.json",
        "verify[max=32,eps=0.05,bound_methods=IBP].json", "verify[max=32,eps=0.05,bound_methods=IBP].tsv"]
    lines = (tmp_path / "run" / "verify[max=32,eps=0.05,bound_methods=IBP].tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in lines[1:]] == list(range(32))  # every image once, from rank 0
    assert done.stderr.count("prune epoch 1/1") == 1  # rank 0 alone logs
    printed = json.loads(done.stdout)  # and prints: one JSON document
    assert printed == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert printed["method"] == "hydra" and printed["sparsity"] > 0.89
    assert record_of(printed, "verify")["images"]["count"] == 32


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ValueError, match="requested but"):
                resolve_device(spec)
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["pretrain", "--out", "{tmp}/run"], ["prune", "--k", "0.1", "--from", "{tmp}"],
                                     ["verify", "--from", "{tmp}"], ["certify", "--from", "{tmp}"],
                                     ["evaluate", "--from", "{tmp}"], ["sweep", "--out", "{tmp}/sweep"]])
def test_device_cuda_without_a_gpu_is_a_one_line_error(command, tmp_path):
    result = run(*[part.format(tmp=tmp_path) for part in command], "--device", "cuda")
    assert_one_line_error(result, "device cuda requested but")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
