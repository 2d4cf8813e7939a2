"""The pack as ComfyUI sees it: entry point, node ids, models folder, packaging metadata."""
import asyncio
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_NODE_IDS = {
    "ProbeSelectTap", "ProbeSelectEarlySampler", "ProbeSelectLoadProbe", "ProbeSelectScore",
    "ProbeSelectTopK", "ProbeSelectResume", "ProbeSelectSampler", "ProbeSelectCollectSampler",
    "ProbeSelectDatasetWriter", "ProbeSelectTrain", "ProbeSelectEvaluateProbe", "ProbeSelectCLIPScore",
    "ProbeSelectImageReward", "ProbeSelectHPSv2", "ProbeSelectPickScore", "ProbeSelectEvaluateImages",
    "ProbeSelectScoresFromFloats", "ProbeSelectPreviewScore",
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
