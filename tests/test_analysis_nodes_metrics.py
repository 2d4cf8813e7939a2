"""Image-metric and OOD nodes inside ComfyUI: schemas, reports with counts and warnings, reference
stats reuse, progress and Cancel, and every bad input refused with an error naming the node."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from probe_select.probes.analysis import image_metrics as im


def smooth_images(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 5, 5, generator=g)
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


class TinyInception(nn.Module):
    """Stands in for the FID Inception: 8 pool features and 5 logits."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        self.fc = nn.Linear(8, 5)

    def forward(self, pixels):
        pool = F.relu(self.conv(pixels * 2 - 1)).mean(dim=(2, 3))
        return {"pool": pool, "logits": self.fc(pool)}


@pytest.fixture(scope="module")
def nodes(pack):
    from probe_select.nodes import nodes_image_metrics, nodes_ood
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.analysis import features as feat
    return nodes_image_metrics, nodes_ood, ProbeSelectError, feat


@pytest.fixture(scope="module")
def dirs(pack, tmp_path_factory):
    import folder_paths

    out = tmp_path_factory.mktemp("output")
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    yield out
    folder_paths.set_output_directory(old_out)


def tiny_extractor(feat, seed=0):
    return feat.ModuleExtractor(TinyInception(seed), kind="inception", input_size=32)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((255.0 * image.numpy()).clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def metrics(node, **kwargs):
    defaults = dict(fid=False, kid=False, inception_score=False, precision_recall=False, density_coverage=False,
                    cmmd=False, clip_score=False, resize_mode="legacy", batch_size=8, kid_subset_size=1000,
                    is_splits=4)
    defaults.update(kwargs)
    return node.execute(**defaults)


def test_schemas_and_registration(nodes, pack):
    import asyncio

    nim, nood, _, _ = nodes
    ids = set()
    for node in nim.IMAGE_METRICS_NODES + nood.OOD_NODES:
        info = node.GET_NODE_INFO_V1()
        assert info["category"] == "sampling/probe_select/analysis"
        ids.add(node.define_schema().node_id)
    assert ids == {"ProbeSelectLoadInception", "ProbeSelectImageMetrics", "ProbeSelectSaveReferenceStats",
                   "ProbeSelectOODFit", "ProbeSelectOODScore"}
    listed = {n.define_schema().node_id for n in asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())}
    assert ids <= listed
    info = nim.ProbeSelectImageMetrics.GET_NODE_INFO_V1()
    assert info["output"] == ["STRING"] + ["FLOAT"] * 9
    assert info["output_name"][1:] == list(nim.FLOAT_OUTPUTS)
    assert nim.ProbeSelectImageMetrics.validate_inputs(fid=False, kid=False).startswith("[ProbeSelectImageMetrics]")
    assert nim.ProbeSelectImageMetrics.validate_inputs() is True
    import folder_paths
    assert "inception" in folder_paths.folder_names_and_paths


def test_image_metrics_against_a_folder_match_the_math(nodes, dirs, tmp_path):
    nim, _, _, feat = nodes
    extractor = tiny_extractor(feat)
    generated = smooth_images(14, seed=1)
    reference_images = [smooth_images(1, 40 + 4 * (i % 3), 32, seed=100 + i)[0] for i in range(12)]  # mixed sizes
    folder = write_folder(tmp_path / "ref", reference_images)
    out = metrics(nim.ProbeSelectImageMetrics, images=generated, inception=extractor, reference_folder=str(folder),
                  fid=True, kid=True, inception_score=True, precision_recall=True)
    report, fid, kid, isc, precision, recall, density, coverage, cmmd, clip_score = out.result
    # The same numbers straight from the math, on features of the same pixels.
    gen = feat.extract_features([generated], [extractor], "legacy")["inception"]
    files = feat.list_image_files(folder)
    ref = feat.extract_features(feat.iter_image_folder(files), [extractor], "legacy")["inception"]
    assert fid == pytest.approx(im.fid_from_features(gen.get("pool"), ref.get("pool")), rel=1e-9)
    assert kid == pytest.approx(im.kid(gen.get("pool"), ref.get("pool"), subset_size=1000).value, rel=1e-9)
    assert isc == pytest.approx(im.inception_score(gen.get("logits"), 4).value, rel=1e-9)
    assert (precision, recall) == tuple(v.value for v in im.precision_recall(gen.get("pool"), ref.get("pool")))
    assert all(math.isnan(v) for v in (density, coverage, cmmd, clip_score))
    assert "fid: " in report and "(14 generated vs 12 reference)" in report and "subset_size=12" in report
    assert report.count("warning:") == 5 and "needs at least 2,048" in report and "needs at least 5,000" in report
    assert "resize: legacy" in report and extractor.extractor_id in report and "12 images" in report
    assert out.ui.as_dict()["text"][0] == report


def test_saved_reference_stats_are_reused_and_refused_for_another_extractor(nodes, dirs, tmp_path):
    nim, _, ProbeSelectError, feat = nodes
    extractor = tiny_extractor(feat)
    reference = smooth_images(10, seed=5)
    folder = write_folder(tmp_path / "ref2", reference)
    (report,) = nim.ProbeSelectSaveReferenceStats.execute("my_ref", "legacy", 4, image_folder=str(folder),
                                                          inception=extractor).result
    path = os.path.join(dirs, "probe_select_reference", "my_ref.safetensors")
    assert os.path.isfile(path) and "images: 10" in report and "warning: 10 reference images" in report
    assert "my_ref.safetensors" in nim.reference_files()
    generated = smooth_images(9, seed=6)
    from_folder = metrics(nim.ProbeSelectImageMetrics, images=generated, inception=extractor,
                          reference_folder=str(folder), fid=True).result
    from_stats = metrics(nim.ProbeSelectImageMetrics, images=generated, inception=extractor,
                         reference_stats="my_ref.safetensors", fid=True).result
    assert from_stats[1] == pytest.approx(from_folder[1], rel=1e-9)
    assert "reference: my_ref.safetensors (inception: 10 images" in from_stats[0]

    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectImageMetrics\] 'my_ref.safetensors' was made with the "
                                               r"extractor .* Fix: connect the extractor"):
        metrics(nim.ProbeSelectImageMetrics, images=generated, inception=tiny_extractor(feat, seed=3),
                reference_stats="my_ref.safetensors", fid=True)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectImageMetrics\] .*resize mode 'legacy', not 'clean'"):
        metrics(nim.ProbeSelectImageMetrics, images=generated, inception=extractor,
                reference_stats="my_ref.safetensors", fid=True, resize_mode="clean")


def test_bad_inputs_name_the_node_and_the_fix(nodes, dirs, tmp_path):
    nim, _, ProbeSelectError, feat = nodes
    extractor = tiny_extractor(feat)
    folder = write_folder(tmp_path / "ref3", smooth_images(6, seed=7))
    node = nim.ProbeSelectImageMetrics
    cases = [
        (dict(images=smooth_images(3), inception=extractor, reference_folder=str(folder), precision_recall=True),
         "precision_recall needs at least 4 generated images, got 3"),
        (dict(images=smooth_images(5), reference_folder=str(folder), fid=True),
         "fid need\\(s\\) inception features, but the inception input is not connected"),
        (dict(images=smooth_images(5), inception=extractor, fid=True), "neither reference_stats nor reference_folder"),
        (dict(inception=extractor, reference_folder=str(folder), fid=True), "no generated images"),
        (dict(images=smooth_images(5), inception=extractor, reference_folder=str(tmp_path / "nope"), fid=True),
         "reference folder .* does not exist"),
        (dict(images=smooth_images(5), inception="a string", fid=True), "not an Inception feature extractor"),
        (dict(images=smooth_images(5), clip=extractor, clip_score=True, prompts="a cat"),
         "not a CLIPScore evaluator"),
        (dict(images=smooth_images(5), inception=extractor, reference_folder=str(folder)), "no metric is selected"),
        (dict(images=smooth_images(4), inception=extractor, inception_score=True, is_splits=10),
         "inception_score needs at least 10 generated images, got 4"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectImageMetrics\] .*" + message + ".*Fix: "):
            metrics(node, **kwargs)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectSaveReferenceStats\] name '../x'"):
        nim.ProbeSelectSaveReferenceStats.execute("../x", "clean", 4, images=smooth_images(2), inception=extractor)


def test_load_inception_never_downloads_and_checks_the_hash(nodes, tmp_path, monkeypatch):
    import folder_paths

    nim, _, ProbeSelectError, _ = nodes
    with pytest.raises(ProbeSelectError) as info:
        nim.ProbeSelectLoadInception.execute("none", "cpu")
    message = str(info.value)
    assert message.startswith("[ProbeSelectLoadInception]") and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "ComfyUI/models/inception" in message and "sha256sum" in message
    folder = tmp_path / "inception"
    folder.mkdir()
    torch.save({"fc.weight": torch.zeros(2)}, folder / "pt_inception-2015-12-05-6726825d.pth")
    # Registered for this test only: tmp_path may be gone when later tests list the folder.
    paths, extensions = folder_paths.folder_names_and_paths["inception"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "inception", ([str(folder), *paths], extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert nim.inception_files()[0] == "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectLoadInception\] .*not the standard FID Inception file"):
        nim.ProbeSelectLoadInception.execute("pt_inception-2015-12-05-6726825d.pth", "cpu")


def test_progress_reaches_the_total_and_cancel_stops(nodes, dirs, tmp_path):
    import comfy.model_management as mm
    import comfy.utils

    nim, _, _, feat = nodes
    extractor = tiny_extractor(feat)
    folder = write_folder(tmp_path / "ref4", smooth_images(7, seed=8))
    seen = []
    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        metrics(nim.ProbeSelectImageMetrics, images=smooth_images(10), inception=extractor,
                reference_folder=str(folder), fid=True, batch_size=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
    # Every batch updates the bar (5 updates on 0.3.75); 0.33 throttles updates to the hook, so only
    # the order, an intermediate value and the final total are the same on every version.
    assert seen[-1] == (17, 17) and [v for v, _ in seen] == sorted(v for v, _ in seen) and 2 <= len(seen) <= 5
    mm.interrupt_current_processing(True)            # what the Cancel button does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            metrics(nim.ProbeSelectImageMetrics, images=smooth_images(10), inception=extractor,
                    reference_folder=str(folder), fid=True, batch_size=4)
    finally:
        mm.interrupt_current_processing(False)


def test_cmmd_and_clip_score_through_a_clip_evaluator(nodes, dirs, tmp_path):
    from probe_select.probes.evaluators import CLIPScoreEvaluator

    nim, _, ProbeSelectError, _ = nodes
    torch.manual_seed(0)
    clip = CLIPScoreEvaluator("ViT-S-32", weights=None, allow_random_weights=True)
    images = smooth_images(6, 48, 40, seed=9)
    folder = write_folder(tmp_path / "same", images)          # the same images, saved as PNG
    out = metrics(nim.ProbeSelectImageMetrics, images=images, clip=clip, reference_folder=str(folder), cmmd=True,
                  clip_score=True, prompts="a red apple")
    report, *floats = out.result
    values = dict(zip(nim.FLOAT_OUTPUTS, floats))
    assert abs(values["cmmd"]) < 1e-9                          # legacy mode quantises both sides identically
    assert 0.0 <= values["clip_score"] <= 100.0 and "open_clip:ViT-S-32" in report
    assert "cmmd: " in report and "(6 generated vs 6 reference; sigma=10.0" in report
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectImageMetrics\] 2 prompt lines for 6 images"):
        metrics(nim.ProbeSelectImageMetrics, images=images, clip=clip, clip_score=True, prompts="a\nb")
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectImageMetrics\] clip_score needs the prompts"):
        metrics(nim.ProbeSelectImageMetrics, images=images, clip=clip, clip_score=True, prompts="")


def test_ood_fit_and_score_on_latents_and_refuse_other_features(nodes, dirs):
    _, nood, ProbeSelectError, feat = nodes
    g = torch.Generator().manual_seed(0)
    reference = {"samples": torch.randn(60, 4, 16, 16, generator=g)}
    fitted, report = nood.ProbeSelectOODFit.execute("lat_ref", "clean", latent=reference).result
    assert "reference samples: 60" in report and "warning: the reference has 60 samples" in report
    assert os.path.isfile(os.path.join(dirs, "probe_select_ood", "lat_ref.safetensors"))
    fresh = {"samples": torch.cat([torch.randn(3, 4, 16, 16, generator=g), torch.full((1, 4, 16, 16), 5.0)])}
    report, scores, percentiles, worst = nood.ProbeSelectOODScore.execute(latent=fresh, reference=fitted).result
    assert len(scores) == 4 and percentiles[3] == 100.0 and worst == 100.0 and "sample 3:" in report
    assert report.splitlines()[4].endswith("unusual")
    from_file = nood.ProbeSelectOODScore.execute(latent=fresh, reference_file="lat_ref.safetensors").result
    assert from_file[1] == pytest.approx(scores)

    images = smooth_images(4)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectOODScore\] .*fitted on 'latent:pool4:channels4'"):
        nood.ProbeSelectOODScore.execute(images=images, inception=tiny_extractor(feat),
                                         reference_file="lat_ref.safetensors")
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectOODScore\] no reference"):
        nood.ProbeSelectOODScore.execute(latent=fresh)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectOODFit\] 0 feature extractors are connected"):
        nood.ProbeSelectOODFit.execute("x", "clean", images=images)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectOODFit\] an OOD reference needs at least 2"):
        nood.ProbeSelectOODFit.execute("x", "clean", latent={"samples": torch.randn(1, 4, 8, 8)})


def test_ood_on_image_features(nodes, dirs):
    _, nood, _, feat = nodes
    extractor = tiny_extractor(feat)
    fitted, report = nood.ProbeSelectOODFit.execute("img_ref", "clean", images=smooth_images(30, seed=11),
                                                    inception=extractor).result
    assert fitted.features == f"{extractor.extractor_id}:pool:clean" and "(8 dimensions)" in report
    _, scores, percentiles, _ = nood.ProbeSelectOODScore.execute(images=smooth_images(3, seed=12),
                                                                 inception=extractor, reference=fitted).result
    assert len(percentiles) == 3 and all(0 <= p <= 100 for p in percentiles)
