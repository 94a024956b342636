"""Soundness fuzzing (issue 21): ``certprune verify`` on random foreign ONNX networks and random boxes never claims
what is false.

The cases come from ``tests/fuzz_networks.py`` (ONNX files written node by node over every operator the importer
reads, boxes ordinary, degenerate, point-like, clipped and very wide), the verdicts from the cascade (IBP, CROWN,
alpha-CROWN, and the MILP on tiny networks; through ``verify_instances`` on the written files for every fourth
case, else on ``load_onnx``'s model directly; branch and bound on tiny networks too), and the judgement from
``tests/fuzz_judge.py``: onnxruntime at
sampled and PGD points, and an exact brute force over activation patterns on tiny networks. The last tests break
the verifier on purpose and check that the judge notices, so that a silent judge cannot pass the suite.
"""
import collections
import logging

import numpy as np
import pytest
import torch

import fuzz_judge
from certprune.certify import cascade
from certprune.certify.onnx_import import load_onnx
from fuzz_judge import judge_case
from fuzz_networks import BOX_KINDS, Network, Property, forward, make_case, write_case

# (family, first seed, cases): about 300 properties in all, in chunks of a few seconds each
CHUNKS = [("plain", start, 10) for start in range(0, 50, 10)] + \
         [("negative-scale", start, 8) for start in range(1000, 1024, 8)] + \
         [("final-relu", start, 8) for start in range(2000, 2024, 8)]


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # the cascade logs each property it leaves unknown
    yield
    logging.disable(logging.NOTSET)


def findings(family: str, seeds) -> list[str]:
    """Every wrong verdict and other problem the judge finds on the cases of ``seeds``, one line each."""
    found = []
    for seed in seeds:
        case = make_case(seed, family)
        for judged in judge_case(case, public=seed % 4 == 0):
            found += [f"{family} seed {seed}, property {judged.index} ({judged.kind} box, verdict {judged.verdict}):"
                      f" {text}" for text in dict.fromkeys(judged.wrong + judged.problems)]
    return found


@pytest.mark.parametrize("family,start,count", CHUNKS, ids=[f"{f}-{s}" for f, s, _ in CHUNKS])
def test_every_verdict_and_bound_on_fuzzed_networks_holds_up_against_onnxruntime_and_brute_force(family, start,
                                                                                                  count):
    found = findings(family, range(start, start + count))
    assert not found, "\n".join(found[:12])


def test_a_zero_scale_is_refused_in_one_line_before_any_work(tmp_path):
    for seed in range(3000, 3004):
        case = make_case(seed, "zero-scale")
        write_case(case, tmp_path / str(seed))
        with pytest.raises(ValueError) as error:
            load_onnx(tmp_path / str(seed) / "model.onnx")
        assert "zero" in str(error.value) and "\n" not in str(error.value)
        judged = judge_case(case, public=True, folder=tmp_path / f"public-{seed}")
        assert {j.verdict for j in judged} == {"refused"} and not any(j.problems for j in judged)


def test_the_cases_cover_every_operator_and_box_kind():
    """The suite's seeds reach what they are meant to: each operator form and each box kind (so that a generator
    that drifted into narrower cases fails here, not silently)."""
    features, kinds = collections.Counter(), collections.Counter()
    for family, start, count in CHUNKS:
        for seed in range(start, start + count):
            case = make_case(seed, family)
            features.update(f.split("(")[0] for f in case.network.features)
            features.update(f for f in case.network.features if f.startswith(("Reshape", "Gemm(transB")))
            kinds.update(p.kind for p in case.properties)
            assert case.network.refusal is None
    for needed in ("Sub", "Add", "Mul", "Div", "Mul<0", "Div<0", "Conv", "Gemm", "MatMul+Add=True",
                   "MatMul+Add=False", "Flatten", "Reshape(0,-1)", "Reshape(shape)", "final Relu"):
        assert features[needed] >= 2, (needed, features)
    assert any(f.startswith("Gemm(transB=0") for f in features) and any(f.startswith("Gemm(transB=1")
                                                                        for f in features)
    assert set(kinds) == set(BOX_KINDS)


def test_the_generators_float64_network_is_what_onnxruntime_computes():
    for seed in range(20):
        case = make_case(seed, "plain")
        x = np.concatenate([np.stack([p.lower, p.upper]) for p in case.properties])
        logits = fuzz_judge.session(case.network)(x)
        assert np.abs(forward(case.network.steps, x) - logits).max() <= 1e-5 * fuzz_judge.scale_of(case.network, x)


def test_the_brute_force_minimum_is_the_minimum_over_a_fine_grid():
    """On 2-input networks with two layers of 6 ReLUs, seeded with the box's centre alone: the exact minimum is at or
    below every grid point's margin and within the grid's resolution of the grid's best, and the network takes it
    at the minimiser found, inside the box."""
    rows = np.array([[1.0, -1, 0], [1, 0, -1]])
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 401), np.linspace(-0.5, 1.5, 401)), -1).reshape(-1, 2)
    prop = Property(np.float32([-1, -0.5]), np.float32([1, 1.5]), 0, (1, 2), "ordinary")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        steps = [("affine", rng.normal(size=(6, 2)), rng.normal(size=6)), ("relu",),
                 ("affine", rng.normal(size=(6, 6)), rng.normal(size=6)), ("relu",),
                 ("affine", rng.normal(size=(3, 6)), rng.normal(size=3))]
        on_grid = (forward(steps, grid) @ rows.T).min(0)
        exact, where = fuzz_judge.exact_minima(Network(b"", (2,), steps), prop, np.array([[0.0, 0.5]]))
        lipschitz = np.abs(rows @ steps[4][1]) @ np.abs(steps[2][1]) @ np.abs(steps[0][1]).sum(1)
        assert (exact <= on_grid + 1e-9).all() and (exact >= on_grid - lipschitz * 0.0025).all()
        assert np.allclose((forward(steps, where) @ rows.T).diagonal(), exact, atol=1e-7)
        assert ((where >= prop.lower - 1e-9) & (where <= prop.upper + 1e-9)).all()


# -- the judge notices a broken verifier ---------------------------------------------------------------------------
def test_the_judge_reports_verdicts_a_broken_bound_stage_claims(monkeypatch):
    """Every open box "verified" by IBP: the judge must call out the ones that do not hold."""
    def everything_holds(self, method, todo, *args, **kwargs):
        self.stage[todo] = cascade.STAGES.index(method) + 1
        self.margin[todo] = 1.0

    monkeypatch.setattr(cascade.Cascade, "bound", everything_holds)
    wrong = [text for seed in range(6) for judged in judge_case(make_case(seed, "plain")) for text in judged.wrong]
    assert any("verified by IBP, but onnxruntime's margin is" in text for text in wrong)
    assert any("verified by IBP, but the exact minimum margin is" in text for text in wrong)


def test_the_judge_reports_bounds_above_the_truth_and_a_misread_network(monkeypatch):
    real = fuzz_judge.BoundedProxy.box_spec_bounds

    def lifted(self, *args, **kwargs):
        return [bound + 0.5 for bound in real(self, *args, **kwargs)]

    monkeypatch.setattr(fuzz_judge.BoundedProxy, "box_spec_bounds", lifted)
    real_load = fuzz_judge.load_onnx

    def misread(path):
        model, shape = real_load(path)
        with torch.no_grad():
            model[-1].bias += 0.1
        return model, shape

    monkeypatch.setattr(fuzz_judge, "load_onnx", misread)
    problems = [text for judged in judge_case(make_case(0, "plain")) for text in judged.problems]
    assert any("IBP's bound" in text and "exceeds its value" in text and "at the box's centre" in text
               for text in problems)
    assert any(text.startswith("the importer's model differs from onnxruntime") for text in problems)


def test_the_judge_reports_a_counterexample_that_is_not_one(monkeypatch):
    def any_point_violates(self, i, candidate, by):
        self.falsified[i], self.falsified_by[i] = True, by
        self.counterexamples[i] = candidate if i % 2 else self.upper[i] + 1  # the box's centre, or outside the box
        return True

    monkeypatch.setattr(cascade.Cascade, "falsify", any_point_violates)
    wrong = [text for seed in range(3) for judged in judge_case(make_case(seed, "plain")) for text in judged.wrong]
    assert "falsified by centre with a counterexample outside the box" in wrong
    assert any(text.startswith("falsified by centre, but onnxruntime's margin at the counterexample is")
               for text in wrong)
