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
