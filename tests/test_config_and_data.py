"""Configs are plain data with overrides; data sets load from the package or from disk, or fail in one line."""
import gzip

import numpy as np
import pytest
import torch

from certprune.config import ConfigError, load_config, parse_override
from certprune.data import DatasetNotFound, load_dataset


def test_override_syntax_parses_yaml_values():
    assert parse_override("prune.epochs=5") == {"prune": {"epochs": 5}}
    assert parse_override("k=[0.1, 0.01]") == {"k": [0.1, 0.01]}
    assert parse_override("verify=null") == {"verify": None}
    with pytest.raises(ConfigError):
        parse_override("prune.epochs")


def test_file_then_overrides_later_ones_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune: {epochs: 3, lr: 0.01}\nk: [0.5]\n")
    config = load_config(path, [{"prune": {"epochs": 7}}])
    assert config.prune.epochs == 7 and config.prune.lr == 0.01 and config.k == [0.5]
    assert config.finetune.epochs == load_config().finetune.epochs


def test_naming_another_loss_replaces_the_loss_parameters():
    config = load_config(None, [{"loss": {"name": "natural"}, "verify": None}])
    assert config.loss == {"name": "natural"}
    config = load_config(None, [{"loss": {"eps": 0.3}}])
    assert config.loss == {"name": "crown-ibp", "eps": 0.3, "kappa_start": 1.0, "kappa_end": 0.0,
                           "beta_start": 1.0, "beta_end": 0.0}


def test_phase_loss_merges_the_phase_overrides():
    config = load_config(None, [{"pretrain": {"loss": {"ramp_epochs": 4}}}])
    schedule = {"kappa_start": 1.0, "kappa_end": 0.0, "beta_start": 1.0, "beta_end": 0.0}
    assert config.phase_loss("pretrain") == ("crown-ibp", {"eps": 0.1, **schedule, "ramp_epochs": 4})
    assert config.phase_loss("prune") == ("crown-ibp", {"eps": 0.1, **schedule})


def test_a_bound_loss_pretrains_with_an_eps_ramp_unless_told_otherwise():
    """Without a ramp, IBP at full eps from random weights never leaves chance (the bare headline command did)."""
    assert load_config().phase_loss("pretrain")[1]["ramp_epochs"] == 8  # 40 % of the default 20 epochs
    assert load_config(None, [{"pretrain": {"epochs": 5}}]).phase_loss("pretrain")[1]["ramp_epochs"] == 2
    assert load_config(None, [{"pretrain": {"loss": {"ramp_epochs": 0}}}]).phase_loss("pretrain")[1]["ramp_epochs"] == 0
    assert "ramp_epochs" not in load_config(None, [{"loss": {"name": "pgd", "eps": 0.1}}]).phase_loss("pretrain")[1]
    assert "ramp_epochs" not in load_config().phase_loss("prune")[1]  # the pruned model starts robust


def test_unknown_keys_and_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key finetune.speed"):
        load_config(None, [{"finetune": {"speed": 1}}])
    (tmp_path / "bad.yaml").write_text("k: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_embedded_mnist_is_real_and_split():
    data = load_dataset("mnist-embedded")
    assert data.train_x.shape == (8500, 1, 28, 28) and data.test_x.shape == (1500, 1, 28, 28)
    assert data.train_x.min() == 0 and data.train_x.max() == 1 and data.train_x.dtype == torch.float32
    assert torch.bincount(data.test_y).tolist() == [150] * 10
    assert data.shape() == {"in_channels": 1, "image_size": 28, "num_classes": 10}


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_files_load_from_data_dir(tmp_path, suffix):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n))
    data = load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_y.shape == (5,)
    assert data.train_x.max() <= 1


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFound, match="missing train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound, match="needs --data-dir pointing at cifar-10-python.tar.gz from"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
