"""Tiny configurations that run the real pipeline in seconds."""
from certprune.config import load_config

TINY = {
    "model": "cnn-small",
    "batch_size": 64,
    "train_examples": 256,
    "loss": {"name": "ibp", "eps": 0.05},
    "pretrain": {"epochs": 2, "lr": 0.002, "loss": {"ramp_epochs": 1}},
    "prune": {"epochs": 1, "lr": 0.001},
    "finetune": {"epochs": 1, "lr": 0.001},
    "k": [0.1],
    "verify": {"max_examples": 64, "methods": ["IBP", "CROWN-IBP"]},
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
