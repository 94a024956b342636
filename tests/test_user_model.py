"""A user's own network, as a file and a callable or as ONNX, pruned and verified from the command line; its origin
recorded and checked; every bad model one line before any work, nothing left behind."""
import hashlib
import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from certprune.data import load_dataset
from certprune.inputs import prepared
from certprune.runs import load_run
from helpers import assert_one_line_error, record_of, run

DATA = Path(__file__).parent / "data"
QUICK = ["--set", "prune.epochs=1", "--set", "finetune.epochs=1", "--set", "batch_size=100"]
IBP = ["--loss", "ibp", "--eps", 0.05]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding tests/data, as a clone's root would: relative paths work, and the run
    cache (runs/) lands here."""
    shutil.copytree(DATA, tmp_path / "tests" / "data", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def user_net(seed=0):
    """The module ``tests/data/user_net.py:make`` returns under ``seed``, as a run with that seed builds it."""
    make = runpy.run_path(str(DATA / "user_net.py"))["make"]
    torch.manual_seed(seed)
    return make()


def test_the_goal_commands_a_user_callable_and_npz_data_pruned_then_verified(workdir):
    result = run("prune", "--model", "tests/data/user_net.py:make", "--dataset", "npz:tests/data/tiny.npz",
                 "--k", 0.1, *IBP, *QUICK, "--out", "runs/user")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("runs/user/metrics.json").read_text())
    assert metrics["method"] == "hydra" and metrics["sparsity"] == pytest.approx(0.9, abs=0.002)
    digest = hashlib.sha256(Path("tests/data/user_net.py").read_bytes()).hexdigest()
    assert metrics["model_origin"] == {"kind": "callable", "callable": "tests/data/user_net.py:make", "module": None,
                                       "factory": "make", "file": str(workdir / "tests/data/user_net.py"),
                                       "sha256": digest}
    (dense,) = Path("runs/cache").iterdir()  # no pretraining: the dense run holds make()'s own weights
    assert json.loads((dense / "metrics.json").read_text())["model_origin"]["sha256"] == digest
    for name, tensor in user_net().state_dict().items():
        assert torch.equal(load_run(dense).state_dict()[name], tensor), name
    result = run("verify", "--from", "runs/user", "--max", 50)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout).values()
    assert record["images"]["count"] == 50 and 0 <= record["verified_acc"] <= record["clean_acc"]


def test_a_changed_model_file_is_refused_by_resume_and_by_loading_the_run(workdir):
    args = ["--model", "tests/data/user_net.py:make", "--dataset", "npz:tests/data/tiny.npz", *IBP,
            "--set", "pretrain.epochs=0", "--set", "verify=null", "--out", "dense"]
    assert run("pretrain", *args).exit_code == 0
    with open("tests/data/user_net.py", "a") as handle:
        handle.write("# edited\n")
    assert_one_line_error(run("pretrain", *args, "--resume"), "was made with other settings (model_origin.sha256 ")
    assert_one_line_error(run("verify", "--from", "dense"), "user_net.py, which has changed since (sha256 ")


def trained_user_net(steps=150):
    """make()'s network trained for a moment on tiny.npz (about 60 % test accuracy), in eval mode."""
    data = load_dataset(f"npz:{DATA / 'tiny.npz'}")
    model = user_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        batch = torch.randint(0, len(data.train_x), (64,))
        loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data


def test_the_same_network_as_onnx_has_the_modules_dense_accuracy_and_prunes(workdir):
    model, data = trained_user_net()
    torch.save(model.state_dict(), "weights.pt")
    torch.onnx.export(model, data.test_x[:1], "model.onnx", dynamo=False, input_names=["x"], output_names=["y"])
    common = ["--dataset", "npz:tests/data/tiny.npz", *IBP, "--set", "pretrain.epochs=0",
              "--set", "verify.bound_methods=[IBP]"]
    module = run("pretrain", "--model", "tests/data/user_net.py:make", "--weights", "weights.pt", *common,
                 "--out", "module")
    onnx = run("pretrain", "--model", "model.onnx", *common, "--out", "onnx")
    assert module.exit_code == 0 and onnx.exit_code == 0, module.output + onnx.output
    accuracy = [record_of(json.loads(result.stdout), "verify")["clean_acc"] for result in (module, onnx)]
    with torch.no_grad():
        expected = int((model(data.test_x).argmax(1) == data.test_y).sum()) / len(data.test_y)
        assert accuracy == [expected, expected] and expected > 0.4
        assert torch.allclose(load_run("onnx")(data.test_x), model(data.test_x), atol=1e-5)
    result = run("prune", "--model", "model.onnx", "--dataset", "npz:tests/data/tiny.npz", "--k", 0.1, *IBP, *QUICK,
                 "--set", "verify.bound_methods=[IBP]", "--out", "pruned")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("pruned/metrics.json").read_text())
    assert metrics["model_origin"]["kind"] == "onnx" and metrics["sparsity"] == pytest.approx(0.9, abs=0.002)
    assert metrics["model_origin"]["sha256"] == hashlib.sha256(Path("model.onnx").read_bytes()).hexdigest()


def test_prune_from_a_user_run_takes_its_model_and_refuses_another(workdir):
    model, _ = trained_user_net(steps=1)
    torch.save(model.state_dict(), "weights.pt")
    dense = ["--model", "tests/data/user_net.py:make", "--dataset", "npz:tests/data/tiny.npz", *IBP,
             "--set", "verify=null"]
    result = run("pretrain", *dense, "--weights", "weights.pt", "--set", "pretrain.epochs=0", "--out", "dense")
    assert result.exit_code == 0, result.output
    result = run("prune", "--from", "dense", "--dataset", "npz:tests/data/tiny.npz", "--k", 0.5, *IBP, *QUICK,
                 "--set", "verify=null", "--out", "pruned")
    assert result.exit_code == 0, result.output
    made = json.loads(Path("dense/metrics.json").read_text())["model_origin"]
    assert json.loads(Path("pruned/metrics.json").read_text())["model_origin"] == made and "weights" in made
    assert_one_line_error(run("prune", "--from", "dense", *dense, "--k", 0.5, "--out", "other"),
                          "dense holds a model made otherwise than the config says (model_origin.weights ")
    assert_one_line_error(run("prune", "--from", "dense", "--weights", "weights.pt", "--k", 0.5, "--out", "other"),
                          "--from gives the dense model; --weights is for a prune without it")
    assert not Path("other").exists()


def test_a_residual_network_from_a_user_file_prunes_by_weight_and_verifies_with_ibp_and_crown(workdir):
    result = run("prune", "--model", "tests/data/user_net.py:make_residual", "--dataset", "npz:tests/data/tiny.npz",
                 "--k", 0.1, *IBP, "--pretrain", "--set", "pretrain.epochs=4", "--set", "pretrain.lr=0.01",
                 "--set", "batch_size=32", "--set", "prune.epochs=1", "--set", "finetune.epochs=2",
                 "--set", "finetune.lr=0.005", "--set", "verify.bound_methods=[IBP,CROWN]", "--out", "residual")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("residual/metrics.json").read_text())
    assert metrics["granularity"] == "weight" and metrics["sparsity"] == pytest.approx(0.9, abs=0.002)
    verified = record_of(metrics, "verify")
    assert verified["verified_acc"] > 0.1 and verified["verified_acc_ibp"] <= verified["verified_acc"]
    assert "verified_extra_crown" in verified
    result = run("evaluate", "--from", "residual", "--steps", 20)  # an attack never beats a proof
    assert result.exit_code == 0, result.output
    (attacked,) = json.loads(result.stdout).values()
    assert attacked["pgd_acc"] >= verified["verified_acc"]
    files = sorted(p.name for p in Path("residual").iterdir())
    for stage in ("MILP", "BaB"):
        assert_one_line_error(run("verify", "--from", "residual", "--method", "IBP", "--method", stage),
                              "the complete stages (MILP, BaB) take a plain nn.Sequential of Linear, Conv2d, ReLU, "
                              "Flatten, Normalize only")
    assert sorted(p.name for p in Path("residual").iterdir()) == files  # no verify TSV begun


def test_what_a_residual_network_cannot_take_is_one_line_before_any_work(workdir):
    base = ["--model", "tests/data/user_net.py:make_residual", "--dataset", "npz:tests/data/tiny.npz", "--k", 0.1,
            *IBP, "--out", "out"]
    assert_one_line_error(run("prune", *base, "--granularity", "channel"),
                          "channel granularity needs a plain nn.Sequential model; a Residual ties channels")
    assert_one_line_error(run("prune", *base, "--set", "verify.bound_methods=[IBP,MILP]"),
                          "the complete stages (MILP, BaB) take a plain nn.Sequential of Linear, Conv2d, ReLU, "
                          "Flatten, Normalize only, which model tests/data/user_net.py:make_residual is not; drop them "
                          "from verify.bound_methods")
    assert not Path("out").exists() and not Path("runs").exists()


BAD_FILES = {
    "returns.py": "def make():\n    return 3\n",
    "raises.py": "def make():\n    raise RuntimeError('no GPU here')\n",
    "broken.py": "def make(:\n",
    "five.py": "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(49, 5))\n",
    "conv1d.py": "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(49, 10), "
                 "nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 1, 1), nn.Flatten())\n",
}


def write_bad_inputs():
    for name, text in BAD_FILES.items():
        Path(name).write_text(text)

    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"conv.weight": Payload()}, "foreign.pt")
    torch.save(nn.Linear(3, 3).state_dict(), "other.pt")
    torch.save([torch.zeros(2)], "list.pt")
    sigmoid = nn.Sequential(nn.Flatten(), nn.Linear(49, 10), nn.Sigmoid())
    torch.onnx.export(sigmoid, torch.zeros(1, 1, 7, 7), "sigmoid.onnx", dynamo=False)


@pytest.mark.parametrize("args, fragment", [
    (["--model", "returns.py:make"], "model returns.py:make: make() returned an object of type int, not a "
                                     "torch.nn.Module"),
    (["--model", "raises.py:make"], "model raises.py:make: make() failed (RuntimeError: no GPU here)"),
    (["--model", "broken.py:make"], "broken.py failed (SyntaxError: "),
    (["--model", "tests/data/user_net.py:nope"], "user_net.py defines no 'nope'"),
    (["--model", "nowhere.py:make"], "model file nowhere.py does not exist"),
    (["--model", "no_such_package.nets:make"],
     "model no_such_package.nets:make: no module named 'no_such_package.nets'"),
    (["--model", "nowhere.onnx"], "ONNX file nowhere.onnx does not exist"),
    (["--model", "sigmoid.onnx"], "sigmoid.onnx: op Sigmoid at node 2"),
    (["--model", "sigmoid.onnx", "--weights", "other.pt"],
     "weights: the ONNX file sigmoid.onnx carries its own weights"),
    (["--model", "tests/data/user_net.py:make", "--weights", "nowhere.pt"], "weights file nowhere.pt does not exist"),
    (["--model", "tests/data/user_net.py:make", "--weights", "foreign.pt"], "foreign.pt: it holds Python objects "
     "beyond tensors, which certprune never loads (save model.state_dict() instead)"),
    (["--model", "tests/data/user_net.py:make", "--weights", "other.pt"],
     "does not fit model tests/data/user_net.py:make (Missing key(s) in state_dict: \"conv.weight\""),
    (["--model", "tests/data/user_net.py:make", "--weights", "list.pt"],
     "list.pt holds no state_dict (a mapping of parameter names to tensors)"),
    (["--model", "tests/data/user_net.py:make", "--dataset", "mnist-embedded"],
     "model tests/data/user_net.py:make cannot take mnist-embedded's images of shape (1, 28, 28) (RuntimeError: "),
    (["--model", "five.py:make"], "model five.py:make gives outputs of shape (5,) per image, but "
     "npz:tests/data/tiny.npz has 10 classes (one more than its largest label; an npz file may store num_classes)"),
    (["--model", "conv1d.py:make"], "model conv1d.py:make: 3 (Conv1d) holds weights certprune cannot prune; its "
                                    "prunable layers must be Conv2d or Linear"),
    (["--model", "cnn-small", "--set", "inputs.range=[0,255]"], "inputs: model cnn-small normalises its own inputs"),
    (["--model", "tests/data/user_net.py:make", "--set", "inputs.range=[1,0]"], "range must be [low, high] with "
                                                                                 "low < high"),
    (["--model", "tests/data/user_net.py:make", "--set", "inputs.std=[0.5,-1]"], "config inputs: std must be > 0"),
    (["--model", "tests/data/user_net.py:make", "--set", "inputs.mean=[0.5,0.5]"],
     "inputs.mean and inputs.std need one value for all 1 channels or one per channel, got 2 and 1"),
    (["--model", "model:"], "unknown model 'model:'; choose from"),
])
def test_every_bad_model_is_one_line_before_any_work_and_leaves_nothing(workdir, args, fragment):
    write_bad_inputs()
    before = sorted(p.name for p in workdir.iterdir())
    result = run("prune", "--dataset", "npz:tests/data/tiny.npz", *args, "--k", 0.1, *IBP, "--out", "out")
    assert_one_line_error(result, fragment)
    assert "owned" not in result.output
    assert sorted(p.name for p in workdir.iterdir()) == before  # no out/, no runs/cache


def test_a_registry_model_starts_from_weights_trained_elsewhere(workdir):
    from certprune.models import create_model

    torch.manual_seed(5)
    trained = create_model("cnn-small", in_channels=1, image_size=7)
    torch.save(trained.state_dict(), "cnn.pt")
    result = run("pretrain", "--model", "cnn-small", "--weights", "cnn.pt", "--dataset", "npz:tests/data/tiny.npz",
                 *IBP, "--set", "pretrain.epochs=0", "--set", "verify=null", "--out", "dense")
    assert result.exit_code == 0, result.output
    for name, tensor in trained.state_dict().items():
        assert torch.equal(load_run("dense").state_dict()[name], tensor), name
    origin = json.loads(Path("dense/metrics.json").read_text())["model_origin"]
    assert origin["kind"] == "registry" and origin["weights"]["file"] == str(workdir / "cnn.pt")
    assert_one_line_error(run("pretrain", "--model", "cnn-small", "--weights", "cnn.pt", "--set", "weight_init=ibp"),
                          "weight_init: 'ibp'; model cnn-small with weights takes default")


def test_input_settings_map_unit_images_to_what_the_model_expects_and_are_recorded(workdir):
    result = run("pretrain", "--model", "tests/data/user_net.py:make", "--dataset", "npz:tests/data/tiny.npz", *IBP,
                 "--set", "inputs.range=[0,255]", "--set", "inputs.mean=[100]", "--set", "inputs.std=[50]",
                 "--set", "pretrain.epochs=0", "--set", "verify=null", "--out", "scaled")
    assert result.exit_code == 0, result.output
    inputs = {"range": [0.0, 255.0], "mean": [100.0], "std": [50.0]}
    assert json.loads(Path("scaled/metrics.json").read_text())["inputs"] == inputs
    assert "inputs:\n  range:\n  - 0.0\n  - 255.0\n  mean:\n  - 100.0" in Path("scaled/config.yaml").read_text()
    x = load_dataset("npz:tests/data/tiny.npz").test_x[:8]
    with torch.no_grad():
        assert torch.allclose(load_run("scaled")(x), user_net()((255 * x - 100) / 50), atol=1e-5)
        signed = prepared(user_net(), {"range": [-1.0, 1.0], "mean": None, "std": None}, channels=1)
        assert torch.allclose(signed(x), user_net()(2 * x - 1), atol=1e-5)
