"""Specification of the verification run driver (certprune.certify.verify_run): one line per image, written as it
goes; an interrupted verification resumes to exactly the figures of an uninterrupted one; lines of another model
are never resumed."""
import copy
import json
import types

import pytest
import torch

from certprune.certify import verify, verify_run
from certprune.config import VerifyConfig
from certprune.runs import RunError
from helpers import trained_7x7

EPS = 0.02
SETTINGS = VerifyConfig(eps=EPS, bound_methods=["IBP", "CROWN", "MILP"], batch_size=16, timeout=5.0,
                        alpha_iterations=3)


@pytest.fixture(scope="module")
def trained():
    return trained_7x7()


def job(run_dir, indices, restart=False, **changes):
    return types.SimpleNamespace(**SETTINGS.model_copy(update=changes).model_dump(), run_dir=run_dir,
                                 key="verify[test]", indices=indices, restart=restart)


def rows_of(run_dir):
    return verify_run.read_rows(run_dir / "verify[test].tsv")


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    model, x, y = trained
    run_dir = tmp_path_factory.mktemp("whole")
    return run_dir, verify_run.evaluate(model, x, y, job(run_dir, list(range(100, 100 + len(x)))))


def test_the_file_holds_one_line_per_image_with_the_cascades_verdict(trained, uninterrupted):
    model, x, y = trained
    run_dir, figures = uninterrupted
    rows = rows_of(run_dir)
    assert sorted(rows) == list(range(100, 100 + len(x)))  # test-set indices, each once
    direct = verify.evaluate(model, x, y, SETTINGS)  # the algorithm on all images at once
    assert [(r["verified_by"], r["falsified"]) for r in direct["_per_image"]] == \
        [(rows[100 + i]["verified_by"], rows[100 + i]["falsified"]) for i in range(len(x))]
    for name in ("clean_acc", "verified_acc", "falsified_acc", "unknown_acc", "verified_acc_ibp",
                 "verified_extra_crown", "verified_extra_milp", "robust_acc_exact"):
        assert figures[name] == pytest.approx(direct[name]), name
    assert 0 < figures["falsified_acc"] and 0 < figures["verified_acc"] < figures["clean_acc"]


def test_saved_counterexamples_misclassify_inside_the_box(trained, uninterrupted):
    model, x, y = trained
    run_dir, figures = uninterrupted
    saved = torch.load(run_dir / "verify[test].counterexamples.pt", weights_only=True)
    falsified = sorted(i for i, row in rows_of(run_dir).items() if row["falsified"])
    assert sorted(saved["index"].tolist()) == falsified
    places = saved["index"] - 100
    assert ((saved["inputs"].double() - x[places].double()).abs() <= EPS).all()  # exact in double
    assert ((saved["inputs"] >= 0) & (saved["inputs"] <= 1)).all()
    with torch.no_grad():
        assert (model(saved["inputs"]).argmax(1) != y[places]).all()


def test_an_interrupted_verification_resumes_to_the_same_figures(trained, uninterrupted, tmp_path, monkeypatch):
    model, x, y = trained
    original, calls = verify.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(verify, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify_run.evaluate(model, x, y, job(tmp_path, list(range(100, 100 + len(x)))))
    assert len(rows_of(tmp_path)) == verify_run.MILP_CHUNK  # the first chunk was kept
    with open(tmp_path / "verify[test].tsv", "a") as stream:
        stream.write("116\t3\t3\tIB")  # a line an interruption cut off
    monkeypatch.setattr(verify, "evaluate", original)
    resumed = verify_run.evaluate(model, x, y, job(tmp_path, list(range(100, 100 + len(x)))))
    whole = uninterrupted[1]
    assert resumed["resumed_examples"] == verify_run.MILP_CHUNK
    assert rows_of(tmp_path).keys() == rows_of(uninterrupted[0]).keys()
    for name in ("verified_acc", "falsified_acc", "unknown_acc", "verified_extra_milp", "robust_acc_exact"):
        assert resumed[name] == whole[name], name
    saved = torch.load(tmp_path / "verify[test].counterexamples.pt", weights_only=True)
    assert len(saved["index"]) == round(whole["falsified_acc"] * len(x))


def test_lines_of_another_model_are_refused_unless_restarted(trained, uninterrupted, tmp_path):
    model, x, y = trained
    indices = list(range(100, 110))
    verify_run.evaluate(model, x[:10], y[:10], job(tmp_path, indices, bound_methods=["IBP"]))
    changed = copy.deepcopy(model)  # the same net with one bias moved
    with torch.no_grad():
        changed[-1].bias[0] += 1.0
    with pytest.raises(RunError, match="another model.*--restart"):
        verify_run.evaluate(changed, x[:10], y[:10], job(tmp_path, indices, bound_methods=["IBP"]))
    figures = verify_run.evaluate(changed, x[:10], y[:10], job(tmp_path, indices, restart=True, bound_methods=["IBP"]))
    assert figures["resumed_examples"] == 0 and len(rows_of(tmp_path)) == 10
    stored = json.loads((tmp_path / "verify[test].json").read_text())
    assert stored["settings"]["bound_methods"] == ["IBP"]


def test_a_line_whose_label_differs_from_the_data_set_is_refused(trained, tmp_path):
    model, x, y = trained
    verify_run.evaluate(model, x[:4], y[:4], job(tmp_path, [0, 1, 2, 3], bound_methods=["IBP"]))
    with pytest.raises(RunError, match="labels"):
        verify_run.evaluate(model, x[:4], (y[:4] + 1) % 10, job(tmp_path, [0, 1, 2, 3], bound_methods=["IBP"]))
