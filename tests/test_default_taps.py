"""The `auto` tap on the real architectures (built on the meta device: structure only, no weights)."""
import pytest
import torch


def _patcher(config, model_type=None):
    import comfy.model_base
    import comfy.model_patcher

    config.set_inference_dtype(torch.float16, None)
    meta = torch.device("meta")
    if model_type is not None:
        model = comfy.model_base.BaseModel(config, model_type=model_type, device=meta)
    else:
        model = config.get_model({}, "", device=meta)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _unet(**kw):
    base = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                in_channels=4, out_channels=4, use_linear_in_transformer=False, context_dim=768,
                use_temporal_resblock=False, use_temporal_attention=False, model_channels=320,
                num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
    base.update(kw)
    return base


def sd15():
    import comfy.supported_models as sm
    return _patcher(sm.SD15(_unet()))


def sd2():
    import comfy.model_base
    import comfy.supported_models as sm
    return _patcher(sm.SD20(_unet(context_dim=1024, use_linear_in_transformer=True)),
                    comfy.model_base.ModelType.V_PREDICTION)


def sdxl():
    import comfy.supported_models as sm
    return _patcher(sm.SDXL(_unet(context_dim=2048, adm_in_channels=2816, use_linear_in_transformer=True,
                                  num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                                  transformer_depth=[0, 0, 2, 2, 10, 10],
                                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                                  transformer_depth_middle=10)))


def sd3_medium():
    import comfy.supported_models as sm
    return _patcher(sm.SD3({
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        "x_block_self_attn_layers": []}))


def flux_dev():
    # FLUX.1-dev as ComfyUI's checkpoint loader configures it from the file's key names and shapes (meta
    # tensors: nothing allocated), so the fields each version needs (0.33's txt_ids_dims) are its own.
    import comfy.model_detection
    shapes = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
              "guidance_in.in_layer.weight": (3072, 256),
              **{f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)},
              **{f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)}}
    config = comfy.model_detection.model_config_from_unet(
        {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}, "")
    assert type(config).__name__ == "Flux" and config.unet_config["hidden_size"] == 3072
    return _patcher(config)


@pytest.mark.parametrize("build, family, expected, module", [
    (sd15, "sd1", "output_blocks.7.0", "ResBlock"),            # the reference's up_blocks[2].resnets[1]
    (sd2, "sd2", "output_blocks.7.0", "ResBlock"),
    (sdxl, "sdxl", "output_blocks.4.0", "ResBlock"),           # the up level at half the latent resolution
    (sd3_medium, "sd3", "joint_blocks.20", "JointBlock"),      # the reference's transformer_blocks[20]
    (flux_dev, "flux", "single_blocks.19", "SingleStreamBlock"),
])
def test_auto_tap_on_real_architectures(pack, build, family, expected, module):
    from probe_select.nodes.engine.families import auto_tap_path, model_family, resolve_module

    patcher = build()
    assert model_family(patcher) == family
    assert auto_tap_path(patcher) == expected
    assert type(resolve_module(patcher, expected)[1]).__name__ == module
