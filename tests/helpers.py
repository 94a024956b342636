"""Tiny configurations that run the real pipeline in seconds, and the command line as a user meets it."""
import torch
from click.testing import CliRunner
from torch import nn

from certprune import pipeline, runs
from certprune.cli import main
from certprune.config import load_config
from certprune.data import load_dataset
from certprune.models import Normalize, create_model

TINY = {
    "model": "cnn-small",
    "batch_size": 64,
    "train_examples": 256,
    "loss": {"name": "ibp", "eps": 0.05},
    "pretrain": {"epochs": 2, "lr": 0.002, "loss": {"ramp_epochs": 1}},
    "prune": {"epochs": 1, "lr": 0.001},
    "finetune": {"epochs": 1, "lr": 0.001},
    "k": [0.1],
    "verify": {"max": 64, "bound_methods": ["IBP", "CROWN-IBP"]},
}


def tiny_config(**overrides):
    return load_config(None, [TINY, overrides])


def interrupt_certify_after(monkeypatch, images):
    """Make ``Smooth.certify`` raise KeyboardInterrupt, as Ctrl-C would, once ``images`` images are certified;
    returns the list that records each call (``monkeypatch.undo()`` restores the certifier)."""
    from certprune.certify.smoothing import Smooth

    original, calls = Smooth.certify, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > images:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Smooth, "certify", interrupted)
    return calls


def record_of(metrics, section):
    """The one evaluation record of ``section`` in a run's metrics (its key names the settings it was made with)."""
    found = [r for key, r in metrics.get("evaluations", {}).items() if key == section or key.startswith(section + "[")]
    assert len(found) == 1, sorted(metrics.get("evaluations", {}))
    return found[0]


def run(*args):
    """``certprune ARGS`` in-process; ``result.output`` holds stdout and stderr, ``result.stdout`` stdout alone."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    """A handled failure: exit status 1 through click (an uncaught exception would leave another exception on the
    result), and exactly one line of output, ``Error: ...`` containing ``fragment``."""
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit, repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]


def conv_net(seed=0, second_conv=True):
    """For 7x7 images: Normalize, one or two convolutions, two linears."""
    torch.manual_seed(seed)
    convs = [nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU()] + ([nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU()] if second_conv else [])
    return nn.Sequential(Normalize([0.3], [0.4]), *convs, nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 10)).eval()


def trained_7x7():
    """A small conv net trained for a few seconds on 7x7 MNIST: some images verified, some falsified."""
    torch.manual_seed(0)
    data = load_dataset("mnist-embedded")
    shrink = lambda images: nn.functional.avg_pool2d(images, 4)  # noqa: E731
    x, y = shrink(data.train_x[:2000]), data.train_y[:2000]
    model = conv_net(second_conv=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(60):
        batch = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), shrink(data.test_x[:30]), data.test_y[:30]


def bn_net():
    """A VGG-like net with batch norm (random statistics) before and after a max-pool, then Flatten into a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.5]), nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def channel_rows(layer):
    """Per output channel: is every weight of it, and its bias, exactly 0?"""
    zero = (layer.weight.detach().flatten(1) == 0).all(1)
    return zero & (layer.bias.detach() == 0) if layer.bias is not None else zero


def dense_run(run_dir):
    """A finished 'dense' run of a random cnn-small with a tiny config (nothing trained)."""
    config = load_config(None, [{"model": "cnn-small", "train_examples": 64, "batch_size": 32, "verify": None,
                                 "loss": {"name": "natural"}, "prune": {"epochs": 1, "granularity": "channel"},
                                 "finetune": {"epochs": 1, "lr": 0.05}}])
    model = create_model("cnn-small")
    runs.save_model(model, run_dir / "model.pt", {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28,
                                                                                 "num_classes": 10}})
    runs.write_config(run_dir, config.model_copy(update={"prune": config.prune.model_copy(
        update={"granularity": "weight"})}))
    runs.write_metrics(run_dir, {"method": "dense", "k": 1.0})
    return config


def interrupt_training(monkeypatch, at_epoch: int = 0):
    """Make training raise KeyboardInterrupt, as Ctrl-C would, right after epoch ``at_epoch`` (counted from 0 in the
    phase) is checkpointed; ``monkeypatch.undo()`` restores it."""
    real_fit = pipeline.fit

    def fit(*args, on_epoch_end=None, **kwargs):
        def checkpoint_then_stop(epoch, means):
            on_epoch_end(epoch, means)
            if epoch == at_epoch:
                raise KeyboardInterrupt
        return real_fit(*args, on_epoch_end=checkpoint_then_stop, **kwargs)

    monkeypatch.setattr(pipeline, "fit", fit)
