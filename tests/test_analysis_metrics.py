"""Analysis toolkit, image-set metrics and OOD scores: the math against known answers, agreement with
torch-fidelity and torchmetrics on the same images and the same random-weight extractor, the FID
Inception against torch-fidelity's, resize modes, reference files, and calibrated OOD percentiles."""
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from probe_select.probes.analysis import features as feat
from probe_select.probes.analysis import image_metrics as im
from probe_select.probes.analysis import inception as inc
from probe_select.probes.analysis import ood
from probe_select.probes.analysis.report import MetricInputError, MetricSettings, compute_metrics, format_report


def smooth_images(n, h=32, w=32, seed=0):
    """[n, h, w, 3] in 0..1 with smooth, image-like content."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 5, 5, generator=g)
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


class TinyExtractor(nn.Module):
    """A small random CNN: 16 pool features and 10 logits, like a miniature Inception."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")

    def forward(self, pixels):
        x = F.relu(self.conv1(pixels * 2 - 1))
        pool = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return {"pool": pool, "logits": 3 * self.fc(pool)}


class QuantisedPool(nn.Module):
    """TinyExtractor's pool features for torchmetrics, which hands a custom feature module the float
    images as given: quantised to uint8 levels here, as the pack's legacy mode does."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, images):
        return self.tiny(torch.floor((images * 255.0).clamp(0, 255)) / 255.0)["pool"].double()


# ---- FID ------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.RandomState(0).randn(300, 12) @ np.random.RandomState(1).randn(12, 12)
    assert abs(im.fid_from_features(x, x)) < 1e-8
    assert im.fid_from_features(x, x + 1.0) == pytest.approx(12.0, rel=1e-8)       # a shift of 1 in 12 dims


def test_frechet_distance_of_two_gaussians_equals_the_closed_form():
    from scipy.linalg import sqrtm

    rng = np.random.RandomState(3)
    a, b = rng.randn(5, 5), rng.randn(5, 5)
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.randn(5), rng.randn(5)
    root1 = sqrtm(s1).real
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(root1 @ s2 @ root1).real)
    assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    # Commuting (diagonal) covariances: |mu1 - mu2|² + sum (sigma1 - sigma2)².
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    assert im.frechet_distance(np.zeros(3), np.diag(d1), np.ones(3), np.diag(d2)) == pytest.approx(
        3 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), rel=1e-12)
    # From samples of the two Gaussians, FID converges to the closed form.
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    assert im.fid_from_features(x, y) == pytest.approx(closed, rel=0.03)


# ---- KID ------------------------------------------------------------------------------------


def test_kid_is_unbiased_on_samples_of_a_known_distribution():
    """Two discrete distributions on 4 points: the population MMD² is exact. Small samples (n = 6)
    average to it with the unbiased estimator; the biased one is off by far more than the noise."""
    rng = np.random.RandomState(0)
    points = rng.randn(4, 3)
    p, q = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])
    k = im.polynomial_kernel(points, points)
    population = p @ k @ p + q @ k @ q - 2 * p @ k @ q
    n, trials = 6, 4000
    unbiased, biased = [], []
    for _ in range(trials):
        x, y = points[rng.choice(4, n, p=p)], points[rng.choice(4, n, p=q)]
        kxx, kyy, kxy = im.polynomial_kernel(x, x), im.polynomial_kernel(y, y), im.polynomial_kernel(x, y)
        unbiased.append(im.mmd2_unbiased(kxx, kyy, kxy))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    stderr = np.std(unbiased) / np.sqrt(trials)
    assert abs(np.mean(unbiased) - population) < 4 * stderr
    assert abs(np.mean(biased) - population) > 10 * stderr
    # kid() over random subsets of two large samples: mean near the population value, std reported.
    x, y = points[rng.choice(4, 3000, p=p)], points[rng.choice(4, 3000, p=q)]
    value = im.kid(x, y, subsets=50, subset_size=200)
    assert value.value == pytest.approx(population, rel=0.05) and value.std > 0
    assert value.details["subset_size"] == 200 and value.n_generated == 3000 and not value.warning
    small = im.kid(x[:50], y[:80], subsets=3, subset_size=1000)
    assert small.details["subset_size"] == 50 and "unreliable" in small.warning


# ---- Inception Score ------------------------------------------------------------------------


def test_inception_score_known_values():
    # Confident, uniformly spread predictions over C classes: IS = C. One class for all: IS = 1.
    logits = torch.full((40, 8), -50.0)
    logits[torch.arange(40), torch.arange(40) % 8] = 50.0
    assert im.inception_score(logits, splits=5).value == pytest.approx(8.0, rel=1e-9)
    assert im.inception_score(torch.zeros(40, 8), splits=4).value == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="at least 10 images"):
        im.inception_score(logits[:9], splits=10)


# ---- precision / recall / density / coverage ------------------------------------------------


def _grid(n=10):
    a = np.arange(n, dtype=np.float64)
    return np.stack(np.meshgrid(a, a), -1).reshape(-1, 2)


def test_precision_recall_density_coverage_on_constructed_sets():
    real = _grid()                                                       # 100 points, spacing 1
    precision, recall = im.precision_recall(real, real.copy(), k=3)
    assert precision.value == 1.0 and recall.value == 1.0
    density, coverage = im.density_coverage(real, real.copy(), k=5)
    assert coverage.value == 1.0
    # Far away: nothing is inside any ball.
    far = real + 100.0
    assert [v.value for v in im.precision_recall(far, real)] == [0.0, 0.0]
    assert [v.value for v in im.density_coverage(far, real)] == [0.0, 0.0]
    # Half of the generated samples on the reference grid, half far away: precision 1/2.
    half = np.concatenate([real[::2], far[::2]])
    assert im.precision_recall(half, real)[0].value == pytest.approx(0.5)
    # Mode collapse: every generated sample near one reference point. Precision stays 1, recall and
    # coverage collapse; density counts how many reference balls hold each sample (constant here).
    centre = real[55] + np.array([0.3, 0.2])          # off the grid: no point on a ball's boundary
    collapsed = centre + np.random.RandomState(0).randn(100, 2) * 1e-4
    p, r = im.precision_recall(collapsed, real)
    d, c = im.density_coverage(collapsed, real, k=5)
    inside = np.linalg.norm(real - centre, axis=1) < im.knn_radii(real, 5).numpy()
    assert p.value == 1.0 and r.value == 0.0 and c.value == pytest.approx(inside.mean())
    assert d.value == pytest.approx(inside.sum() / 5)


def test_coverage_of_two_samples_of_one_distribution_is_near_its_expected_value():
    rng = np.random.RandomState(1)
    n, k = 400, 5
    values = [im.density_coverage(rng.randn(n, 6), rng.randn(n, 6), k=k) for _ in range(3)]
    coverage = np.mean([c.value for _, c in values])
    density = np.mean([d.value for d, _ in values])
    assert im.expected_coverage(n, n, k) == pytest.approx(1 - np.prod([(n - i) / (2 * n - i) for i in range(1, 6)]))
    assert coverage == pytest.approx(im.expected_coverage(n, n, k), abs=0.02)
    assert density == pytest.approx(1.0, abs=0.1)


# ---- CMMD and CLIPScore ---------------------------------------------------------------------


def test_cmmd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.RandomState(2)
    x = rng.randn(200, 32)
    same = im.cmmd(x, x)
    assert abs(same.value) < 1e-9 and same.details["estimator"] == "paired U-statistic"
    near = im.cmmd(x, rng.randn(200, 32))
    shifted = im.cmmd(x, rng.randn(200, 32) + 0.5)
    assert abs(near.value) < shifted.value / 5 and shifted.value > 0
    uneven = im.cmmd(x, rng.randn(150, 32) + 0.5)
    assert uneven.details["estimator"] == "two-sample unbiased" and uneven.value > 0
    # The scale: 1000 x MMD² of normalised embeddings with sigma 10.
    xn, yn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x[:3], x[3:6]))
    kern = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 200.0)   # noqa: E731
    kxx, kyy, kxy = kern(xn, xn), kern(yn, yn), kern(xn, yn)
    manual = (kxx.sum() - 3) / 6 + (kyy.sum() - 3) / 6 - 2 * (kxy.sum() - np.trace(kxy)) / 6
    assert im.cmmd(x[:3], x[3:6]).value == pytest.approx(1000 * manual, rel=1e-9)


def test_clip_score_per_image():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    mean, per_image = im.clip_score(img, txt)
    assert per_image.tolist() == pytest.approx([100.0, 0.0, 100 / np.sqrt(2)])
    assert mean.value == pytest.approx(per_image.mean().item()) and mean.n_generated == 3


# ---- agreement with the libraries -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fid_kid_is_pr_agree_with_torch_fidelity_and_torchmetrics():
    """Same images, same random-weight extractor: the pack's numbers equal the libraries' within 1e-4."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    tiny = TinyExtractor()
    extractor = feat.ModuleExtractor(tiny, kind="inception", input_size=32)
    generated, reference = smooth_images(40, seed=1), smooth_images(40, seed=2) * 0.8 + 0.1
    # legacy resize at the native size = the uint8 quantisation torchmetrics applies (normalize=True).
    gen = feat.extract_features([generated[:25], generated[25:]], [extractor], "legacy", batch_size=16)["inception"]
    ref = feat.extract_features([reference], [extractor], "legacy")["inception"]
    x, y = gen.get("pool"), ref.get("pool")
    settings = MetricSettings(kid_subsets=7, kid_subset_size=30, is_splits=4, pr_k=3)
    values = {v.name: v for v in compute_metrics(["fid", "kid", "inception_score", "precision_recall"],
                                                 {"inception": gen.as_dict()}, {"inception": ref.as_dict()},
                                                 settings=settings)}

    fid_tf = fid_statistics_to_metric(fid_features_to_statistics(x.double()), fid_features_to_statistics(y.double()),
                                      verbose=False)["frechet_inception_distance"]
    assert values["fid"].value == pytest.approx(fid_tf, rel=1e-4) and fid_tf > 0.01
    kid_tf = kid_features_to_metric(x.double(), y.double(), kid_subsets=7, kid_subset_size=30, rng_seed=2020,
                                    verbose=False)
    assert values["kid"].value == pytest.approx(kid_tf["kernel_inception_distance_mean"], rel=1e-4)
    assert values["kid"].std == pytest.approx(kid_tf["kernel_inception_distance_std"], rel=1e-4)
    is_tf = isc_features_to_metric(gen.get("logits"), splits=4, shuffle=False)
    assert values["inception_score"].value == pytest.approx(is_tf["inception_score_mean"], rel=1e-4)
    assert values["inception_score"].std == pytest.approx(is_tf["inception_score_std"], rel=1e-4)
    precision_tf, recall_tf = calculate_precision_recall_full(x.double(), y.double(), neighborhood=3)
    assert (values["precision"].value, values["recall"].value) == pytest.approx((precision_tf, recall_tf), abs=1e-6)

    # torchmetrics end to end from the images (its own uint8 conversion, its own statistics).
    fid_tm = FrechetInceptionDistance(feature=QuantisedPool(tiny), normalize=True)
    fid_tm.update(reference.permute(0, 3, 1, 2), real=True)
    fid_tm.update(generated.permute(0, 3, 1, 2), real=False)
    assert values["fid"].value == pytest.approx(float(fid_tm.compute()), rel=1e-4)
    kid_tm = KernelInceptionDistance(feature=QuantisedPool(tiny), normalize=True, subsets=2, subset_size=40)
    kid_tm.update(reference.permute(0, 3, 1, 2), real=True)
    kid_tm.update(generated.permute(0, 3, 1, 2), real=False)
    full = im.kid(x, y, subsets=1, subset_size=40)          # full sets: no sampling left to differ
    assert full.value == pytest.approx(float(kid_tm.compute()[0]), rel=1e-4)


# ---- the FID Inception ----------------------------------------------------------------------


def _kaiming(model, seed=0):
    """Random weights that keep activations O(1) through 40+ layers (default init shrinks them)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval()


def test_fid_inception_matches_torch_fidelity_on_the_same_weights(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = _kaiming(inc.FIDInceptionV3())
    state = model.state_dict()
    assert len(state) == 566                          # the standard file's entry count
    path = tmp_path / "random_inception.pth"
    torch.save(state, path)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(path))
    image = (torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    with torch.inference_mode():
        ours = model(image.float() / 255.0)
        pool, logits = theirs(image)
    assert ours["pool"].abs().mean() > 1e-2
    assert torch.allclose(ours["pool"], pool, rtol=1e-4, atol=1e-5 * pool.abs().max())
    assert torch.allclose(ours["logits"], logits, rtol=1e-4, atol=1e-5 * logits.abs().max())


def test_fid_inception_weights_are_local_and_checked_by_hash(tmp_path):
    with pytest.raises(inc.InceptionWeightsError) as info:
        inc.load_fid_inception(tmp_path / inc.INCEPTION_FILENAME)
    message = str(info.value)
    assert inc.INCEPTION_FILENAME in message and "ComfyUI/models/inception" in message
    assert inc.INCEPTION_SHA256 in message and "sha256sum" in message and "never downloads" in message
    with pytest.raises(inc.InceptionWeightsError, match="no weights file was selected"):
        inc.load_fid_inception(None)

    model = inc.FIDInceptionV3()
    path = tmp_path / "other.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(inc.InceptionWeightsError, match="not the standard FID Inception file"):
        inc.load_fid_inception(path)
    loaded = inc.load_fid_inception(path, expected_sha256=inc.sha256_of_file(path))
    assert torch.equal(loaded.fc.weight, model.fc.weight) and not loaded.training
    assert inc.sha256_of_file(path) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


# ---- resizing, streaming, reference files ---------------------------------------------------


def test_clean_resize_is_pil_bicubic_on_floats_and_legacy_quantises():
    image = smooth_images(1, 40, 56, seed=3)[0]
    clean = feat.resize_image(image, 24, "clean")
    channel = Image.fromarray((image[..., 1].numpy() * 255.0).astype(np.float32), mode="F")
    expected = np.clip(np.asarray(channel.resize((24, 24), resample=Image.BICUBIC)), 0, 255) / 255.0
    assert clean.shape == (3, 24, 24) and np.allclose(clean[1].numpy(), expected, atol=1e-6)
    # clean keeps sub-uint8 differences at the native size; legacy rounds them away.
    nudged = (image + 0.3 / 255.0).clamp(0, 1)
    same_size_clean = feat.resize_image(image[:40, :40], 40, "clean")
    assert torch.allclose(same_size_clean, image[:40, :40].permute(2, 0, 1), atol=1e-6)
    legacy_a = feat.resize_image(image[:40, :40], 40, "legacy")
    assert torch.equal(legacy_a * 255, torch.floor(legacy_a * 255 + 1e-4))          # uint8 levels
    assert not torch.equal(feat.resize_image(image, 24, "clean"), feat.resize_image(nudged, 24, "clean"))
    # Images of different sizes become one batch; CLIP-style crops the centre square first.
    batch = feat.preprocess_images([image, smooth_images(1, 20, 20)[0]], 16, "legacy")
    assert batch.shape == (2, 3, 16, 16)
    wide = torch.zeros(10, 30, 3)
    wide[:, 10:20] = 1.0
    assert feat.resize_image(wide, 10, "clean", crop="center").min() > 0.99
    with pytest.raises(ValueError, match="resize mode"):
        feat.resize_image(image, 8, "nearest")


def test_streaming_features_and_reference_stats_round_trip(tmp_path):
    extractor = feat.ModuleExtractor(TinyExtractor(), kind="inception", input_size=32)
    images = smooth_images(12, seed=4)
    calls = []
    acc = feat.extract_features([images[:5], list(images[5:])], [extractor], "clean", total=12, batch_size=4,
                                progress=lambda done, total: calls.append((done, total)))["inception"]
    assert acc.count == 12 and acc.get("pool").shape == (12, 16) and acc.get("logits").shape == (12, 10)
    assert calls[-1] == (12, 12) and len(calls) == 4            # 5 = 4 + 1, then 7 = 4 + 3
    one_pass = feat.extract_features([images], [extractor], "clean", batch_size=64)["inception"]
    assert torch.allclose(acc.get("pool"), one_pass.get("pool"), atol=1e-6)

    path = feat.save_reference_stats(tmp_path / "ref.safetensors", {"inception": acc}, "clean", source="test set")
    stats = feat.load_reference_stats(path)
    assert stats.counts == {"inception": 12} and stats.resize_mode == "clean" and stats.source == "test set"
    assert torch.equal(stats.require(extractor, "clean")["pool"], acc.get("pool"))
    mu, sigma = im.gaussian_statistics(acc.get("pool"))
    assert np.allclose(stats.fid_statistics[0], mu) and np.allclose(stats.fid_statistics[1], sigma)

    other = feat.ModuleExtractor(TinyExtractor(seed=1), kind="inception", input_size=32)
    with pytest.raises(feat.ReferenceStatsError, match="made with the extractor"):
        stats.require(other, "clean")
    with pytest.raises(feat.ReferenceStatsError, match="resize mode 'clean', not 'legacy'"):
        stats.require(extractor, "legacy")
    clip_like = feat.ModuleExtractor(TinyExtractor(), kind="clip", input_size=32)
    with pytest.raises(feat.ReferenceStatsError, match="holds no clip features"):
        stats.require(clip_like, "clean")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(feat.ReferenceStatsError, match="not a safetensors file"):
        feat.load_reference_stats(bogus)


def test_image_folder_streaming_reads_files_of_any_size(tmp_path):
    for i, (h, w) in enumerate([(20, 30), (32, 32), (40, 24)]):
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("skip me")
    files = feat.list_image_files(tmp_path)
    assert [p.name for p in files] == ["0.png", "1.png", "2.png"]
    batches = list(feat.iter_image_folder(files, batch_size=2))
    assert [len(b) for b in batches] == [2, 1] and batches[1][0].shape == (40, 24, 3)
    pixels = feat.preprocess_images(batches[0], 8, "clean")
    assert pixels.shape == (2, 3, 8, 8) and torch.allclose(pixels[1], torch.full((3, 8, 8), 40 / 255.0), atol=1e-6)


def test_compute_metrics_reports_counts_and_refuses_too_few_images():
    rng = np.random.RandomState(5)
    gen = {"inception": {"pool": torch.tensor(rng.randn(30, 4)), "logits": torch.tensor(rng.randn(30, 5))}}
    ref = {"inception": {"pool": torch.tensor(rng.randn(40, 4))}}
    values = compute_metrics(["fid", "inception_score"], gen, ref, settings=MetricSettings(is_splits=3))
    text = format_report(values, feat.RESIZE_DESCRIPTIONS["clean"], {"inception": "x"}, "ref.safetensors")
    assert "fid: " in text and "(30 generated vs 40 reference)" in text and "splits=3" in text
    assert text.count("warning: ") == 2 and "needs at least 2,048" in text and "resize: clean" in text
    with pytest.raises(MetricInputError, match="precision_recall needs at least 4 generated images, got 3"):
        compute_metrics(["precision_recall"], {"inception": {"pool": gen["inception"]["pool"][:3]}}, ref)
    with pytest.raises(MetricInputError, match="no reference inception features"):
        compute_metrics(["kid"], gen, None)
    with pytest.raises(MetricInputError, match="no clip extractor"):
        compute_metrics(["cmmd"], gen, ref)


# ---- OOD ------------------------------------------------------------------------------------


def test_ood_percentiles_are_calibrated_on_gaussian_data():
    rng = np.random.RandomState(0)
    scales = np.linspace(0.5, 3.0, 16)
    reference = ood.fit_reference(rng.randn(1500, 16) * scales, "test:gaussian")
    fresh = rng.randn(20000, 16) * scales
    scores, percent = ood.mahalanobis(reference, fresh)
    assert 0.006 < (percent > 99).mean() < 0.016
    assert 0.08 < (percent > 90).mean() < 0.12
    assert 0.45 < (percent > 50).mean() < 0.55
    # Far away samples are more unusual than the whole reference.
    _, far = ood.mahalanobis(reference, rng.randn(10, 16) * scales + 20)
    assert (far == 100).all() and (scores > 0).all()


def test_ledoit_wolf_shrinkage_behaves():
    rng = np.random.RandomState(1)
    # Many samples of a strongly non-spherical Gaussian: little shrinkage, covariance near the truth.
    cov = np.diag(np.linspace(0.1, 10, 6))
    mean, shrunk, a = ood.ledoit_wolf(rng.randn(20000, 6) @ np.sqrt(cov))
    assert a < 0.01 and np.allclose(shrunk, cov, atol=0.3)
    # Spherical data: the target is the truth, so shrinkage is strong.
    assert ood.ledoit_wolf(rng.randn(200, 6))[2] > 0.5
    # Fewer samples than dimensions: still positive definite.
    _, small, a_small = ood.ledoit_wolf(rng.randn(10, 30))
    assert 0 < a_small <= 1 and np.linalg.eigvalsh(small).min() > 0


def test_ood_reference_round_trip_warns_and_refuses_other_features(tmp_path, caplog):
    rng = np.random.RandomState(2)
    with caplog.at_level(logging.WARNING):
        small = ood.fit_reference(rng.randn(50, 4), "latent:pool4")
    assert "50 samples" in small.warning and any("fewer than 100" in r.message for r in caplog.records)
    assert not ood.fit_reference(rng.randn(150, 4), "latent:pool4").warning
    path = ood.save_reference(tmp_path / "ref.safetensors", small)
    loaded = ood.load_reference(path, expected_features="latent:pool4")
    x = rng.randn(7, 4)
    assert np.allclose(loaded.score(x), small.score(x)) and np.allclose(loaded.percentile(loaded.score(x)),
                                                                       small.percentile(small.score(x)))
    assert loaded.count == 50 and loaded.warning
    with pytest.raises(ood.OODFileError, match="fitted on 'latent:pool4' features"):
        ood.load_reference(path, expected_features="fid-inception-v3:abc")
    with pytest.raises(ValueError, match="5 dimensions, the reference 4"):
        loaded.score(rng.randn(2, 5))
    assert ood.latent_features(torch.randn(3, 4, 64, 48)).shape == (3, 64)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ood.fit_reference(rng.randn(1, 4), "x")
