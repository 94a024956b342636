"""certprune's Python API on a network in memory: prune it to 10 % of its weights under IBP training, then verify it.

Runs in seconds on a CPU: a small MLP on 1,000 of the MNIST digits that ship with certprune. ``python
examples/prune_and_verify.py`` prints the sparsity, the clean accuracy and the verified accuracy at eps = 0.02.
"""
import torch
from torch import nn

import certprune
from certprune.data import load_dataset

torch.manual_seed(0)
mnist = load_dataset("mnist-embedded")  # images in [0, 1], the unit of eps
train = (mnist.train_x[:1000], mnist.train_y[:1000])
test = (mnist.test_x[:200], mnist.test_y[:200])
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

pruned, record = certprune.prune(model, train, k=0.1, loss="ibp", eps=0.02, batch_size=50,
                                 prune={"epochs": 1, "lr": 0.01}, finetune={"epochs": 2, "lr": 0.005})
report = certprune.verify(pruned, test, eps=0.02, methods=("IBP", "CROWN"))

print(f"sparsity {record['sparsity']:.3f}")
print(f"clean accuracy {report['clean_acc']:.3f}")
print(f"verified accuracy {report['verified_acc']:.3f} (IBP {report['verified_acc_ibp']:.3f}, "
      f"CROWN added {report['verified_extra_crown']:.3f})")
