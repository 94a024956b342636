"""The falsifier branch and bound runs first: PGD on ``logit_j - logit_label`` for each class ``j`` of a property, in
the box's own coordinates, from its centre and from random starts. A point counts only through
:func:`certprune.certify.milp.check_box`, the one way a property becomes falsified."""
from __future__ import annotations

import torch
from torch import nn

from certprune.attacks import PGD
from certprune.certify import milp


def falsify(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, label: int, classes: list[int],
            steps: int, restarts: int):
    """``(margin, input)`` of a counterexample in the box, or None: PGD on ``logit_j - logit_label`` for every ``j``
    in ``classes``, from the box's centre and ``restarts`` uniform random starts each; every end point goes
    through :func:`~certprune.certify.milp.check_box`."""
    if not steps:
        return None
    targets = torch.tensor(classes, device=lower.device)

    def objective(logits, y):
        return logits.gather(1, y[:, None]).squeeze(1) - logits[:, label]

    points = []
    for start, copies in (("zero", 1), ("uniform", restarts)):
        if copies:
            y = targets.repeat(copies)
            inside = milp.BoxCoordinates(model, lower.expand(len(y), *lower.shape), upper.expand(len(y), *upper.shape))
            z = PGD(0.5, steps=steps, start=start).perturb(inside, torch.full_like(inside.lower, 0.5), y, objective)
            points.append(lower + z * (upper - lower))
    points = torch.cat(points)
    with torch.no_grad():
        logits = model(points)
    margins = logits[:, label] - logits[:, classes].max(1).values
    for i in torch.argsort(margins).tolist():
        if margins[i] > 0:
            break
        found = milp.check_box(model, lower, upper, label, classes, points[i])
        if found is not None:
            return found
    return None
