"""Specification of the randomized-smoothing certifier (Cohen et al. 2019) and of certifying a run's test images."""
import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from certprune.certify import smoothing
from certprune.certify.smoothing import ABSTAIN, Smooth, lower_confidence_bound, max_certifiable_radius
from certprune.certify.smoothing_run import SigmaMismatchWarning, certify_run, summarize, training_sigmas
from certprune.config import SmoothingConfig, load_config
from certprune.evaluation import configured_record
from certprune.losses import make_loss
from certprune.models import MODELS
from certprune.runs import RunError
from helpers import interrupt_certify_after

ROOT = Path(__file__).resolve().parents[1]


class Constant(nn.Module):
    """Votes for one class whatever the input."""

    def __init__(self, label=3, classes=5):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(classes))
        with torch.no_grad():
            self.logits[label] = 1.0

    def forward(self, x):
        return self.logits.expand(len(x), -1)


class Guesser(nn.Module):
    """Ignores the input and picks one of ``classes`` uniformly at random (from its own seeded generator)."""

    def __init__(self, classes=10, seed=0):
        super().__init__()
        self.classes, self.generator = classes, torch.Generator().manual_seed(seed)

    def forward(self, x):
        return torch.rand(len(x), self.classes, generator=self.generator)


class Halfspace(nn.Module):
    """The binary linear classifier ``f(x) = [w . x + b > 0]``; its smoothed probability of class 1 is
    ``Phi((w . x + b) / (sigma |w|))``, so the exact robust radius of the smoothed classifier is ``|w . x + b| / |w|``."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


# ---- the certifier -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (1, 28, 28), (2, 3, 4, 5)])
def test_a_constant_classifier_gets_the_closed_form_radius(shape):
    sigma, n, alpha = 0.5, 1000, 0.001
    label, radius = Smooth(Constant(label=3), sigma).certify(torch.rand(shape), n0=100, n=n, alpha=alpha)
    assert label == 3
    assert radius == sigma * norm.ppf(beta.ppf(alpha, n, 1))  # exactly: every vote goes to the constant class
    assert radius == pytest.approx(max_certifiable_radius(sigma, n, alpha), rel=1e-12)
    assert Smooth(Constant(label=3), sigma).predict(torch.rand(shape), n=100, alpha=alpha) == 3


def test_a_classifier_that_guesses_uniformly_at_random_abstains():
    for seed in range(5):
        smooth = Smooth(Guesser(seed=seed), sigma=0.25, seed=seed)
        assert smooth.certify(torch.rand(1, 8, 8), n0=100, n=2000, alpha=0.001) == (ABSTAIN, 0.0)
        assert smooth.predict(torch.rand(1, 8, 8), n=2000, alpha=0.001) == ABSTAIN


def _halfspace_inputs(count, dim=8, sigma=0.5, seed=0):
    """Inputs whose normalised margin |w.x + b| / (sigma |w|) spreads over [0, 3.5] on both sides of the plane."""
    generator = torch.Generator().manual_seed(seed)
    w, b = torch.randn(dim, generator=generator), 0.3
    unit = w / w.norm()
    margins = sigma * w.norm() * 3.5 * torch.rand(count, generator=generator) * (2 * (torch.arange(count) % 2) - 1)
    sideways = torch.randn(count, dim, generator=generator)
    sideways -= (sideways @ unit)[:, None] * unit  # orthogonal to w: does not change the margin
    x = sideways + ((margins - b) / w.norm())[:, None] * unit
    return Halfspace(w, b), x


def _overclaims(model, x, sigma, n0, n, alpha):
    """How many certificates are wrong: a wrong class, or a radius above the exact one."""
    smooth = Smooth(model, sigma, seed=1)
    margins = (x @ model.w + model.b).detach()
    true_radius, true_class = margins.abs() / model.w.norm().detach(), (margins > 0).long()
    wrong_class = too_far = certified = 0
    for point, radius_true, label_true in zip(x, true_radius, true_class):
        label, radius = smooth.certify(point, n0, n, alpha, batch_size=2000)
        if label != ABSTAIN:
            certified += 1
            wrong_class += label != int(label_true)
            too_far += radius > float(radius_true)
    return wrong_class, too_far, certified


def test_a_linear_classifier_is_over_certified_in_at_most_about_alpha_of_the_inputs(monkeypatch):
    sigma, n0, n, alpha, count = 0.5, 50, 500, 0.01, 400
    model, x = _halfspace_inputs(count, sigma=sigma)
    # Each certificate is wrong with probability <= alpha, independently, so the number of wrong ones is at most
    # Binomial(count, alpha) in distribution; exceeding this bound happens with probability < 1e-9 for a sound
    # certifier (and the test is seeded, so it cannot flake).
    tolerance = binom.isf(1e-9, count, alpha)
    wrong_class, too_far, certified = _overclaims(model, x, sigma, n0, n, alpha)
    assert certified > count / 2  # most inputs are far enough from the plane to be certified
    assert wrong_class == 0
    assert too_far <= tolerance
    # The same test catches an unsound certifier: the point estimate n_A / n instead of the lower bound.
    monkeypatch.setattr(smoothing, "lower_confidence_bound", lambda successes, trials, alpha: successes / trials)
    _, too_far_naive, _ = _overclaims(model, x[:100], sigma, n0, n, alpha)
    assert too_far_naive > binom.isf(1e-9, 100, alpha)


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("trials", [1, 10, 1000, 100_000])
def test_the_clopper_pearson_bound_agrees_with_scipys_exact_interval(trials, alpha):
    for successes in sorted({0, 1, trials // 2, trials - 1, trials}):
        # the one-sided (1 - alpha) bound is the lower end of the two-sided (1 - 2 alpha) exact interval, which
        # binomtest finds by root finding to an absolute tolerance of about 1e-12
        exact = binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        assert lower_confidence_bound(successes, trials, alpha) == pytest.approx(exact, rel=1e-9, abs=1e-11)
    # and with one success the bound has a closed form: 1 - (1 - alpha)^(1/n)
    assert lower_confidence_bound(1, trials, alpha) == pytest.approx(-math.expm1(math.log1p(-alpha) / trials), rel=1e-9)


def test_votes_are_reproducible_with_a_seed_and_do_not_touch_the_global_generator():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.rand(1, 4, 4)
    state = torch.get_rng_state()
    first = Smooth(model, 0.5, seed=7).sample_counts(x, 300, batch_size=64)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, Smooth(model, 0.5, seed=7).sample_counts(x, 300, batch_size=64))
    assert int(first.sum()) == 300 and first.shape == (4,)


class Recorder(nn.Module):
    """A small convolutional classifier that keeps every batch it is given, to show what the base classifier sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.net(x)


class Bfloat16(nn.Module):
    """``model`` computed under bf16 autocast, written out by hand: the classifier ``precision="bf16"`` certifies."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


def test_bf16_certifies_the_classifier_as_computed_in_bf16_from_float32_noise():
    x = torch.rand(1, 8, 8)
    fast, by_hand = Recorder(), Recorder()
    votes = Smooth(fast, 0.5, seed=4, precision="bf16").sample_counts(x, 300, batch_size=128)
    assert torch.equal(votes, Smooth(Bfloat16(by_hand), 0.5, seed=4).sample_counts(x, 300, batch_size=128))
    # the noise is drawn and added in float32, exactly as at full precision: only the classifier changes
    full = Recorder()
    Smooth(full, 0.5, seed=4).sample_counts(x, 300, batch_size=128)
    for seen in (fast.inputs, by_hand.inputs):
        assert [batch.dtype for batch in seen] == [torch.float32] * 3
        assert all(torch.equal(a, b) for a, b in zip(seen, full.inputs))


def test_channels_last_and_compile_change_the_speed_not_the_votes_nor_the_model():
    x = torch.rand(1, 8, 8)
    model = Recorder()
    plain = Smooth(model, 0.5, seed=4).sample_counts(x, 300, batch_size=128)
    channels_last = Smooth(model, 0.5, seed=4, channels_last=True)
    assert torch.equal(channels_last.sample_counts(x, 300, batch_size=128), plain)
    assert model.net[0].weight.is_contiguous()  # the caller's model is left as it was (the certifier copies it)
    assert channels_last.classifier.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(Smooth(model, 0.5, seed=4, compile=True).sample_counts(x, 300, batch_size=128), plain)


@pytest.mark.parametrize("call, message", [
    (lambda: Smooth(Constant(), 0.25, precision="fp16"), "precision must be one of fp32, bf16"),
    (lambda: Smooth(Constant(), sigma=0), "sigma must be"),
    (lambda: Smooth(Constant(), sigma=-0.25), "sigma must be"),
    (lambda: Smooth(Constant(), sigma=float("nan")), "sigma must be"),
    (lambda: Smooth(Constant(), 0.25).certify(torch.rand(3), n0=0, n=10, alpha=0.01), "n0 must be"),
    (lambda: Smooth(Constant(), 0.25).certify(torch.rand(3), n0=10, n=-1, alpha=0.01), "n must be"),
    (lambda: Smooth(Constant(), 0.25).certify(torch.rand(3), n0=10, n=10, alpha=0.0), "alpha must be"),
    (lambda: Smooth(Constant(), 0.25).certify(torch.rand(3), n0=10, n=10, alpha=1.0), "alpha must be"),
    (lambda: Smooth(Constant(), 0.25).predict(torch.rand(3), n=0, alpha=0.01), "n must be"),
])
def test_bad_parameters_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- training losses ------------------------------------------------------------------------------------------


def test_noise_losses_are_registered_strict_and_differentiable():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for name, params in (("gaussian", {"sigma": 0.25}), ("stability", {"sigma": 0.25, "beta": 2.0})):
        loss, metrics = make_loss(name, **params)(model, x, y, 0.0)
        loss.backward()
        assert {"loss", "acc"} <= set(metrics) and model[1].weight.grad is not None
        model.zero_grad()
    with pytest.raises(ValueError, match="no parameter eps"):
        make_loss("gaussian", sigma=0.25, eps=0.1)
    with pytest.raises(ValueError, match="sigma must be"):
        make_loss("stability", sigma=0.0)


def test_stability_loss_is_cross_entropy_plus_beta_kl_of_noisy_from_clean():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    loss, metrics = make_loss("stability", sigma=0.5, beta=3.0)(model, x, y, 0.0)
    torch.manual_seed(1)
    noisy = x + 0.5 * torch.randn_like(x)
    p_clean, p_noisy = model(x).softmax(1), model(noisy).softmax(1)
    kl = (p_noisy * (p_noisy.log() - p_clean.log())).sum(1).mean()
    natural = nn.functional.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx((natural + 3.0 * kl).item(), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(kl.item(), rel=1e-4)


# ---- certifying a run: certify.tsv, resume, summary, sigma check --------------------------------------------


def _settings(**overrides):
    return SmoothingConfig(**{"sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.01, "batch": 64, **overrides})


def _data(count=12):
    generator = torch.Generator().manual_seed(3)
    return torch.rand(count, 1, 4, 4, generator=generator), torch.randint(0, 3, (count,), generator=generator)


def _tiny_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def _lines(run_dir):
    return (run_dir / "certify.tsv").read_text().splitlines()


def test_certify_run_writes_one_line_per_image_and_the_summary(tmp_path):
    x, y = _data()
    summary = certify_run(_tiny_model(), x, y, tmp_path, _settings(skip=2, max=5), progress=False)
    lines = _lines(tmp_path)
    assert lines[0].split("\t") == ["index", "label", "prediction", "radius", "correct", "seconds"]
    assert [int(line.split("\t")[0]) for line in lines[1:]] == [0, 2, 4, 6, 8]
    assert summary["certified_examples"] == 5 and set(summary["certified_acc"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert summary["certified_acc_0.5"] == summary["certified_acc"]["0.5"]
    for key in ("sigma", "abstain_rate", "acr", "n", "alpha"):
        assert key in summary


def test_an_interrupted_run_resumes_without_losing_or_repeating_an_image(tmp_path, monkeypatch):
    x, y = _data()
    reference = tmp_path / "uninterrupted"
    certify_run(_tiny_model(), x, y, reference, _settings(), progress=False)

    run_dir = tmp_path / "interrupted"
    interrupt_certify_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        certify_run(_tiny_model(), x, y, run_dir, _settings(), progress=False)
    monkeypatch.undo()
    assert len(_lines(run_dir)) == 1 + 5
    with open(run_dir / "certify.tsv", "a") as stream:  # a line cut off mid-write by the interruption
        stream.write("5\t1\t")
    certify_run(_tiny_model(), x, y, run_dir, _settings(), progress=False)

    def without_seconds(lines):
        return [line.rsplit("\t", 1)[0] for line in lines]

    assert without_seconds(_lines(run_dir)) == without_seconds(_lines(reference))
    calls = interrupt_certify_after(monkeypatch, 5)
    certify_run(_tiny_model(), x, y, run_dir, _settings(), progress=False)  # all done: certifies nothing again
    assert calls == [] and len(_lines(run_dir)) == 1 + len(x)


def test_resuming_with_other_settings_or_another_model_is_refused_unless_restarted(tmp_path):
    x, y = _data()
    certify_run(_tiny_model(), x, y, tmp_path, _settings(max=3), progress=False)
    with pytest.raises(RunError, match="other settings"):
        certify_run(_tiny_model(), x, y, tmp_path, _settings(sigma=0.5, max=3), progress=False)
    other = _tiny_model()
    with torch.no_grad():
        other[1].bias += 1
    with pytest.raises(RunError, match="another model"):
        certify_run(other, x, y, tmp_path, _settings(max=3), progress=False)
    certify_run(other, x, y, tmp_path, _settings(max=3), restart=True, progress=False)
    assert len(_lines(tmp_path)) == 1 + 3


def test_precision_is_part_of_what_a_resumed_file_must_match(tmp_path):
    x, y = _data()
    certify_run(_tiny_model(), x, y, tmp_path, _settings(max=3), progress=False)
    with pytest.raises(RunError, match="precision fp32 -> bf16"):
        certify_run(_tiny_model(), x, y, tmp_path, _settings(max=4, precision="bf16"), progress=False)
    # a file written before the setting existed holds fp32 rows, and resumes at fp32
    sidecar = tmp_path / "certify.json"
    settings = json.loads(sidecar.read_text())
    del settings["precision"]
    sidecar.write_text(json.dumps(settings))
    assert certify_run(_tiny_model(), x, y, tmp_path, _settings(max=4), progress=False)["certified_examples"] == 4
    with pytest.raises(ValueError, match="Input should be 'fp32' or 'bf16'"):  # the settings type refuses it
        certify_run(_tiny_model(), x, y, tmp_path / "other", _settings(precision="half"), progress=False)


def test_certifying_with_another_sigma_than_training_warns_once(tmp_path):
    x, y = _data()
    with pytest.warns(SigmaMismatchWarning, match="trained with sigma=0.5") as record:
        certify_run(_tiny_model(), x, y, tmp_path / "a", _settings(max=4), trained_sigmas=[0.5], progress=False)
    assert len([w for w in record if issubclass(w.category, SigmaMismatchWarning)]) == 1
    summary = certify_run(_tiny_model(), x, y, tmp_path / "b", _settings(sigma=None, max=2), trained_sigmas=[0.25],
                          progress=False)
    assert summary["sigma"] == 0.25 and summary["train_sigma"] == 0.25


def test_the_training_sigma_is_read_from_the_runs_config():
    config = load_config(None, [{"loss": {"name": "gaussian", "sigma": 0.25}, "verify": None}])
    assert training_sigmas(config) == [0.25]
    assert training_sigmas(load_config(None, [{"loss": {"name": "natural"}, "verify": None}])) == []


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*smoothing*.yaml")))
def test_shipped_smoothing_configs_train_with_noise_and_certify_at_their_sigma(path):
    config = load_config(path)  # validates every setting
    assert training_sigmas(config) == [config.smoothing.sigma]
    for phase in ("pretrain", "prune", "finetune"):
        name, params = config.phase_loss(phase)
        assert name in ("gaussian", "stability") and make_loss(name, **params)
    assert config.model in MODELS and config.report_metric.startswith("certified_acc")


def test_the_summary_counts_an_abstention_as_wrong_and_averages_radii_of_correct_images():
    rows = [{"prediction": 1, "correct": 1, "radius": 0.6, "seconds": 1.0},
            {"prediction": 2, "correct": 0, "radius": 0.9, "seconds": 1.0},
            {"prediction": ABSTAIN, "correct": 0, "radius": 0.0, "seconds": 1.0},
            {"prediction": 0, "correct": 1, "radius": 0.2, "seconds": 1.0}]
    summary = summarize(rows, [0.0, 0.25, 0.5, 1.0])
    assert summary["certified_acc"] == {"0": 0.5, "0.25": 0.25, "0.5": 0.25, "1": 0.0}
    assert summary["abstain_rate"] == 0.25 and summary["acr"] == pytest.approx(0.2)


# ---- the pipeline and the sweep ------------------------------------------------------------------------------


def test_a_sweep_certifies_every_run_and_plots_certified_accuracy_against_radius(tmp_path):
    from certprune.sweep import sweep

    config = load_config(None, [{
        "batch_size": 64, "train_examples": 256, "loss": {"name": "gaussian", "sigma": 0.25},
        "pretrain": {"epochs": 1, "lr": 0.002}, "prune": {"epochs": 1}, "finetune": {"epochs": 1}, "k": [0.1],
        "verify": None, "certify": {"n0": 10, "n": 50, "batch": 64, "max": 3},
        "report_metric": "certified_acc_0.5", "report_columns": ["certified_acc_0", "acr"]}])
    rows = sweep(config, tmp_path)
    assert [row["run"] for row in rows] == ["dense", "hydra-k0.1", "lwm-k0.1"]
    for row in rows:
        record = configured_record(row, config, "smoothing")
        assert record["sigma"] == record["train_sigma"] == 0.25 and record["certified_examples"] == 3
        assert record["images"]["count"] == 3 and record["settings"]["n"] == 50
        assert len(_lines(tmp_path / row["run"])) == 1 + 3
    assert "certified_acc_0.5" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "sparsity.png").exists() and (tmp_path / "radius-k0.1.png").exists()
