"""The pack as ComfyUI sees it: entry point, node ids, models folder, packaging metadata."""
import asyncio
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_NODE_IDS = {
    "ProbeSelectTap", "ProbeSelectEarlySampler", "ProbeSelectLoadProbe", "ProbeSelectScore",
    "ProbeSelectTopK", "ProbeSelectResume", "ProbeSelectSampler", "ProbeSelectCollectSampler",
    "ProbeSelectDatasetWriter", "ProbeSelectCompactDataset", "ProbeSelectTrain", "ProbeSelectEvaluateProbe", "ProbeSelectCLIPScore",
    "ProbeSelectImageReward", "ProbeSelectHPSv2", "ProbeSelectPickScore", "ProbeSelectEvaluateImages",
    "ProbeSelectScoresFromFloats", "ProbeSelectPreviewScore", "ProbeSelectEarlySamplerCustom", "ProbeSelectResumeCustom",
    "ProbeSelectPlanSchedule", "ProbeSelectBlendScores",
}


def test_entrypoint_lists_every_public_node(pack):
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    ids = {node.define_schema().node_id for node in nodes}
    assert PUBLIC_NODE_IDS <= ids
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")     # it would make ComfyUI ignore comfy_entrypoint
    assert pack.WEB_DIRECTORY == "./js" and list((ROOT / "js").glob("*.js"))


def test_probes_models_folder_is_registered(pack):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["probes"]
    assert str(Path(folder_paths.models_dir) / "probes") in [str(Path(p)) for p in paths]
    assert ".safetensors" in extensions


def test_the_comfyui_under_test_is_in_the_supported_range(pack):
    # packaging comes with ComfyUI's requirements (transformers needs it).
    from packaging.specifiers import SpecifierSet
    import comfyui_version

    supported = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"])
    assert comfyui_version.__version__ in supported, (comfyui_version.__version__, str(supported))
    assert "0.3.75" in supported and "0.33.0" in supported          # the versions .ci/run tests
    assert "0.3.74" not in supported                                  # older than the V3 schema the pack uses


def test_registry_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in project["project"]["name"].lower()
    assert project["project"]["version"].count(".") == 2
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    requirements = (ROOT / "requirements.txt").read_text()
    # ComfyUI-Manager must never be asked to install torch.
    assert not any(line.split("=")[0].split(">")[0].strip() in {"torch", "torchvision", "torchaudio", "torchsde"}
                   for line in requirements.splitlines() if line and not line.startswith("#"))


def test_suite_runs_in_a_checkout_named_like_the_readme_clones_it(tmp_path):
    """`git clone ... probe-select`: pytest must not import the pack's __init__.py as a package
    named after a folder that is not an identifier (every test errored at set-up)."""
    import os
    import shutil
    import subprocess
    import sys

    from devtools import COMFY_DIR

    checkout = tmp_path / "probe-select"
    (checkout / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pytest.ini"):
        shutil.copy(ROOT / name, checkout / name)
    for name in ("nodes", "probes", "devtools", "tools"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "test_plots.py"):
        shutil.copy(ROOT / "tests" / name, checkout / "tests" / name)
    env = dict(os.environ, COMFYUI_DIR=str(COMFY_DIR))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_plots.py"],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    tests = (ROOT / "tests" / "test_plots.py").read_text().count("\ndef test_")
    assert tests >= 3 and proc.returncode == 0 and f"{tests} passed" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]
