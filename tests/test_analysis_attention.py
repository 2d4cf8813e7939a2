"""Attention maps: the probability math, token selection with ComfyUI's tokenizers, and the node on tiny
SD1.x, SDXL, SD3 and Flux models: a planted attention pattern is recovered and the input model stays unpatched."""
import math
from types import SimpleNamespace

import pytest
import torch

from probe_select.probes.analysis.attention import (FLAT, HEADS, TokenSelectionError, select_tokens, spatial_entropy,
                                       text_attention_probs, tokens_to_map, words_from_pieces)
from devtools.tiny_models import build_tiny

LATENT = 16                   # latent side: UNet levels 16, 8, 4; DiT token grid 8 x 8
CONTEXT = 8                   # tokens of the tiny conditionings
TARGET = 5                    # the planted token


def test_text_attention_probs_match_an_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    b, heads, d, nq, nk = 4, 3, 5, 6, 7
    q = torch.randn(b, heads, nq, d, generator=g)
    k = torch.randn(b, heads, nk, d, generator=g)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)       # [b, h, nq, nk]
    rows, columns = [1, 3], torch.tensor([4, 0])
    want = expected[rows][:, :, 2:][..., columns].mean(dim=(0, 1))
    got = text_attention_probs(q, k, heads, HEADS, slice(2, None), columns, rows)
    assert torch.allclose(got, want, atol=1e-6)
    flat_q = q.transpose(1, 2).reshape(b, nq, heads * d)
    flat_k = k.transpose(1, 2).reshape(b, nk, heads * d)
    assert torch.allclose(text_attention_probs(flat_q, flat_k, heads, FLAT, slice(2, None), columns, rows), want,
                          atol=1e-6)


def test_tokens_to_map_is_row_major_and_resized():
    probs = torch.zeros(6, 2)
    probs[1, 0] = 1.0                          # row 0, column 1 of a 2 x 3 grid
    maps = tokens_to_map(probs, (2, 3), (2, 3))
    assert maps.shape == (2, 2, 3) and float(maps[0, 0, 1]) == 1.0 and float(maps[0].sum()) == 1.0
    assert tokens_to_map(probs, (2, 3), (4, 6)).shape == (2, 4, 6)
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_map(probs, (2, 2), (4, 4))


def test_spatial_entropy_bounds():
    uniform = torch.ones(1, 8, 8)
    peak = torch.zeros(1, 8, 8)
    peak[0, 3, 4] = 5.0
    half = torch.zeros(1, 8, 8)
    half[0, :, :4] = 1.0
    values = spatial_entropy(torch.cat([uniform, peak, half]))
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(0.0, abs=1e-6)
    assert values[2] == pytest.approx(math.log(32) / math.log(64), abs=1e-6)


def test_word_selection_excludes_special_tokens_and_names_missing_words():
    pieces = [None, "a</w>", "red</w>", "sports</w>", "ca", "r</w>", ",</w>", "cat</w>", None, None]
    words = words_from_pieces(pieces)
    assert [(w.text, w.positions) for w in words] == [("a", [1]), ("red", [2]), ("sports", [3]), ("car", [4, 5]),
                                                     ("cat", [7])]
    assert select_tokens("Red Sports, car., #9", words, 10) == [("Red Sports", [2, 3]), ("car.", [4, 5]), ("#9", [9])]
    assert [label for label, _ in select_tokens("", words, 10)] == ["a", "red", "sports", "car", "cat"]
    with pytest.raises(TokenSelectionError, match="'dog' is not a word of the prompt. Its words: a, red"):
        select_tokens("dog", words, 10)
    with pytest.raises(TokenSelectionError, match="out of range"):
        select_tokens("#10", words, 10)
    with pytest.raises(TokenSelectionError, match="pick tokens by index"):
        select_tokens("cat", None, 10)


class TokenizerOnlyClip:
    """Stands in for a CLIP object: ComfyUI's real tokenizer (bundled vocabulary), no text model."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


@pytest.fixture(scope="module")
def attention_node(pack):
    from probe_select.nodes import nodes_attention
    return nodes_attention


def test_prompt_words_with_the_sd1_and_flux_tokenizers(attention_node):
    import comfy.sd1_clip
    import comfy.text_encoders.flux

    sd1 = TokenizerOnlyClip(comfy.sd1_clip.SD1Tokenizer())
    words = attention_node.prompt_words(sd1, "a red car, and a cat", "sd1", 77)
    assert [(w.text, w.positions) for w in words] == [("a", [1]), ("red", [2]), ("car", [3]), ("and", [5]),
                                                     ("a", [6]), ("cat", [7])]
    flux = TokenizerOnlyClip(comfy.text_encoders.flux.FluxTokenizer())
    t5_tokens = sum(len(c) for c in flux.tokenize("a red car, and a cat")["t5xxl"])
    words = attention_node.prompt_words(flux, "a red car, and a cat", "flux", t5_tokens)
    assert [w.text for w in words] == ["a", "red", "car", "and", "a", "cat"]
    # T5 has no start token and spells "a" as the pieces "▁" + "a": one word over two positions
    assert words[0].positions == [0, 1] and words[1].positions == [2] and words[-1].positions == [8]
    from probe_select.nodes.errors import ProbeSelectError
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectAttentionMaps\] the prompt tokenizes to"):
        attention_node.prompt_words(sd1, "a red car", "sd1", 80)


# ---------------------------------------------------------------------------------------------- planted pattern

def _to_heads(x, heads, flat):
    if not flat:
        return x
    b, n, width = x.shape
    return x.reshape(b, n, heads, width // heads).transpose(1, 2)


def _from_heads(x, flat):
    if not flat:
        return x
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def planting_override(family):
    """Another pack's attention override: in every text attention, the queries of the LEFT half of the
    image point at token TARGET with a huge logit, those of the right half away from it; TARGET's key
    is the only non-zero key. The attention probability on TARGET is then ~1 left and ~0 right."""

    def plant(func, *args, **kwargs):
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        flat = not kwargs.get("skip_reshape", False)
        options = kwargs.get("transformer_options") or {}
        length = q.shape[1] if flat else q.shape[2]
        if family in ("sd1", "sdxl"):
            shape = options.get("activations_shape")
            if k.shape[1] != CONTEXT or shape is None or shape[2] * shape[3] != length:
                return func(*args, **kwargs)
            text, (gh, gw) = 0, (shape[2], shape[3])
        else:
            if family == "flux" and options.get("block_type") != "double":
                return func(*args, **kwargs)
            gh = gw = LATENT // 2
            text = length - gh * gw
            if text != CONTEXT:
                return func(*args, **kwargs)
        qh, kh = _to_heads(q, heads, flat), _to_heads(k, heads, flat)
        planted_q, planted_k = torch.zeros_like(qh), torch.zeros_like(kh)
        columns = torch.arange(gh * gw) % gw
        sign = torch.where(columns < gw // 2, 1.0, -1.0).to(qh)
        planted_q[:, :, text:, 0] = 400.0 * sign
        planted_k[:, :, TARGET, 0] = 1.0
        return func(_from_heads(planted_q, flat), _from_heads(planted_k, flat), *args[2:], **kwargs)

    return plant


def _sample(tm, model, seed=3):
    import nodes as comfy_nodes

    (out,) = comfy_nodes.common_ksampler(model, seed, 3, 3.0, "euler", "normal", tm.conditioning(1), tm.conditioning(2),
                                         tm.empty_latent(1, LATENT))
    return out["samples"]


def _run(node_module, tm, model, words="#5, #2", **kw):
    return node_module.ProbeSelectAttentionMaps.execute(
        model, tm.conditioning(1), tm.conditioning(2), tm.empty_latent(1, LATENT), 3, 3, 3.0, "euler", "normal",
        words, kw.pop("show_steps", "auto"), kw.pop("resolutions", "all"), 48, **kw).result


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_planted_attention_is_recovered_at_latent_size(attention_node, family):
    tm = build_tiny(family)
    planted = tm.patcher.clone()
    planted.model_options["transformer_options"]["optimized_attention_override"] = planting_override(family)
    grid, sharpness, masks, latent, summary = _run(attention_node, tm, planted)
    assert masks.shape == (2, LATENT, LATENT)                  # one map per word, the latent's size
    target, other = masks[0], masks[1]
    assert float(target[:, :5].min()) > 0.95, summary          # left: TARGET takes all the attention
    assert float(target[:, 11:].max()) < 0.05                  # right: none
    assert float(other[:, :5].max()) < 0.05                    # another token gets nothing on the left
    assert grid.ndim == 4 and sharpness.ndim == 4
    assert latent["samples"].shape[-2:] == (LATENT, LATENT)
    # the planted token's maps are sharper (half the image) than a uniform spread: entropy ~log(128)/log(256)
    line = [s for s in summary.splitlines() if s.startswith("#5")][0]
    assert float(line.split("->")[-1].split(":")[-1]) < 0.9
    # the other pack's override is still in place on its model
    assert planted.model_options["transformer_options"]["optimized_attention_override"].__name__ == "plant"


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_model_outside_the_node_is_unchanged(attention_node, family):
    tm = build_tiny(family)
    options_before = repr(tm.patcher.model_options)
    before = _sample(tm, tm.patcher)
    _run(attention_node, tm, tm.patcher)
    after = _sample(tm, tm.patcher)
    assert torch.equal(before, after)
    assert repr(tm.patcher.model_options) == options_before
    assert "optimized_attention_override" not in tm.patcher.model_options["transformer_options"]


def test_recording_does_not_change_the_sample(attention_node):
    tm = build_tiny("sd1")
    _, _, _, latent, _ = _run(attention_node, tm, tm.patcher)
    assert torch.equal(latent["samples"], _sample(tm, tm.patcher))


def test_resolution_levels_are_selectable(attention_node):
    tm = build_tiny("sd1")
    *_, all_summary = _run(attention_node, tm, tm.patcher)
    *_, coarse_summary = _run(attention_node, tm, tm.patcher, resolutions="4")
    assert "levels (latent downsampling) [1, 2, 4]" in all_summary
    assert "levels (latent downsampling) [4]" in coarse_summary
    calls = lambda s: int(s.split(": ")[1].split(" attention")[0])
    assert calls(coarse_summary) < calls(all_summary)


def test_words_by_text_through_a_tokenizer(attention_node):
    import comfy.sd1_clip

    tm = build_tiny("sd1")
    clip = TokenizerOnlyClip(comfy.sd1_clip.SD1Tokenizer())
    positive = [[torch.randn(1, 77, tm.context_dim, generator=torch.Generator().manual_seed(9)), {}]]
    out = attention_node.ProbeSelectAttentionMaps.execute(
        tm.patcher, positive, tm.conditioning(2), tm.empty_latent(1, LATENT), 3, 2, 3.0, "euler", "normal",
        "red car", "auto", "all", 48, clip=clip, prompt="a red car, and a cat").result
    assert out[2].shape == (1, LATENT, LATENT)
    assert "red car: tokens [2, 3]" in out[4]
    from probe_select.nodes.errors import ProbeSelectError
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectAttentionMaps\] 'dog' is not a word of the prompt"):
        attention_node.ProbeSelectAttentionMaps.execute(
            tm.patcher, positive, tm.conditioning(2), tm.empty_latent(1, LATENT), 3, 2, 3.0, "euler", "normal",
            "dog", "auto", "all", 48, clip=clip, prompt="a red car, and a cat")


def test_errors_name_the_node(attention_node):
    from probe_select.nodes.errors import ProbeSelectError

    tm = build_tiny("sd1")
    node = attention_node.ProbeSelectAttentionMaps
    unsupported = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(),
                                                        diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectAttentionMaps\] attention maps support .* this model "
                                               r"is 'simplenamespace'"):
        _run(attention_node, tm, unsupported)
    with pytest.raises(ProbeSelectError, match="batch of 2"):
        node.execute(tm.patcher, tm.conditioning(1), tm.conditioning(2), tm.empty_latent(2, LATENT), 3, 3, 3.0,
                     "euler", "normal", "#1", "auto", "all", 48)
    with pytest.raises(ProbeSelectError, match="can't be looked up without the prompt"):
        _run(attention_node, tm, tm.patcher, words="cat")
    with pytest.raises(ProbeSelectError, match=r"step\(s\) \[9\] are outside 1..3"):
        _run(attention_node, tm, tm.patcher, show_steps="1, 9")
    with pytest.raises(ProbeSelectError, match="no text attention was recorded"):
        _run(attention_node, tm, tm.patcher, resolutions="32")
