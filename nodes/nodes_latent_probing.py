"""Latent probing: ProbeSelectLatentSlerp (walk between two latents or two seeds' noises) and
ProbeSelectConditioningDirection (a semantic direction between two prompts, applied with strengths)."""
from __future__ import annotations

import comfy.sample
import torch
from comfy_api.latest import io, ui

from ..probes.analysis.latent import apply_direction, slerp_path, token_direction
from .engine.analysis import ANALYSIS_CATEGORY
from .errors import ProbeSelectError, problem_or_true
from .nodes_sampling import MAX_SEED

SLERP_ID = "ProbeSelectLatentSlerp"
DIRECTION_ID = "ProbeSelectConditioningDirection"
SEED_MODE, LATENT_MODE = "seed noises", "latents"


class SlerpNoise:
    """A NOISE for SamplerCustomAdvanced: row i of the batch is slerp(noise(seed_a), noise(seed_b), i / (rows - 1)).

    Each end is drawn exactly as a batch-1 run with that seed draws it, so the first and last rows
    reproduce plain single-seed samples.
    """

    def __init__(self, seed_a: int, seed_b: int):
        self.seed = seed_a                # what SamplerCustomAdvanced passes on to stochastic samplers
        self.seed_a, self.seed_b = seed_a, seed_b

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        row = samples[:1]
        noise_a = comfy.sample.prepare_noise(row, self.seed_a)
        if samples.shape[0] == 1:
            return noise_a
        noise_b = comfy.sample.prepare_noise(row, self.seed_b)
        return slerp_path(noise_a, noise_b, samples.shape[0])


def _plain_latent(latent: dict) -> dict:
    """Copy of a LATENT without its per-sample entries (they would not match the new batch)."""
    return {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}


class ProbeSelectLatentSlerp(io.ComfyNode):
    NODE_ID = "ProbeSelectLatentSlerp"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Latent Slerp",
            category=ANALYSIS_CATEGORY,
            description="Spherical interpolation in `count` steps, exact at both ends and norm-keeping. "
                        "'seed noises': the NOISE output walks from seed_a's noise to seed_b's (connect it and the "
                        "LATENT to SamplerCustomAdvanced). 'latents': the LATENT output walks from latent_a to "
                        "latent_b (decode it, or sample from it with seed_a's noise).",
            inputs=[
                io.Combo.Input("mode", options=[SEED_MODE, LATENT_MODE], default=SEED_MODE),
                io.Latent.Input("latent_a", tooltip="'seed noises': the latent to sample from (e.g. an empty latent); "
                                                    "'latents': the start of the walk. Batch 1."),
                io.Int.Input("count", default=8, min=2, max=4096, tooltip="Points on the path, both ends included."),
                io.Int.Input("seed_a", default=0, min=0, max=MAX_SEED),
                io.Int.Input("seed_b", default=1, min=0, max=MAX_SEED),
                io.Latent.Input("latent_b", optional=True, tooltip="'latents' mode: the end of the walk. Batch 1."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Noise.Output(display_name="noise")],
        )

    @classmethod
    def execute(cls, mode, latent_a, count, seed_a, seed_b, latent_b=None) -> io.NodeOutput:
        if count < 2:
            raise ProbeSelectError(SLERP_ID, f"count is {count}; a path needs both ends.", "set count to 2 or more.")
        samples_a = latent_a["samples"]
        if samples_a.shape[0] != 1:
            raise ProbeSelectError(SLERP_ID, f"latent_a has a batch of {samples_a.shape[0]}.",
                                   "give a batch-1 latent (use 'Latent From Batch' to pick one).")
        out = _plain_latent(latent_a)
        if mode == LATENT_MODE:
            if latent_b is None:
                raise ProbeSelectError(SLERP_ID, "'latents' mode needs latent_b.",
                                       "connect latent_b, or switch mode to 'seed noises'.")
            samples_b = latent_b["samples"]
            if samples_b.shape != samples_a.shape:
                raise ProbeSelectError(SLERP_ID, f"latent_a is {tuple(samples_a.shape)} but latent_b is "
                                                 f"{tuple(samples_b.shape)}.",
                                       "use two batch-1 latents of one size and model family.")
            out["samples"] = slerp_path(samples_a, samples_b, count)
            noise = SlerpNoise(seed_a, seed_a)         # one shared noise: rows differ by their latent only
        else:
            out["samples"] = samples_a.repeat(count, *([1] * (samples_a.ndim - 1)))
            noise = SlerpNoise(seed_a, seed_b)
        return io.NodeOutput(out, noise)


def parse_strengths(node_id: str, text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ProbeSelectError(node_id, f"strengths '{text}' is not a list of numbers.",
                               "write e.g. '0, 0.5, 1, 1.5'.") from None
    if not values:
        raise ProbeSelectError(node_id, "no strength given.", "write e.g. '0, 0.5, 1, 1.5'.")
    return values


def _single_entry(node_id: str, name: str, conditioning: list) -> tuple[torch.Tensor, dict]:
    if not conditioning:
        raise ProbeSelectError(node_id, f"'{name}' is an empty conditioning.", "connect a text encoder's output.")
    cond, extras = conditioning[0]
    return cond, extras


class ProbeSelectConditioningDirection(io.ComfyNode):
    NODE_ID = "ProbeSelectConditioningDirection"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Conditioning Direction",
            category=ANALYSIS_CATEGORY,
            description="Adds strength x (toward - away_from) to a conditioning, one batch row per strength, and "
                        "repeats the latent with one shared noise per row, so one sampler run shows the attribute "
                        "change at fixed seed. Pooled outputs move along their own difference.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt to move (e.g. 'a portrait photo')."),
                io.Conditioning.Input("toward", tooltip="e.g. 'a smiling portrait photo'."),
                io.Conditioning.Input("away_from", tooltip="e.g. 'a portrait photo'."),
                io.String.Input("strengths", default="0, 0.5, 1, 1.5, 2",
                                tooltip="Comma-separated strengths; one batch row each."),
                io.Combo.Input("mode", options=["per_token", "mean"], default="per_token",
                               tooltip="per_token: token-wise difference (CLIP prompts, padded to 77); mean: difference "
                                       "of token means, for prompts of different token counts (T5)."),
                io.Latent.Input("latent", tooltip="Batch 1; repeated once per strength, every row with the same noise."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, strengths: str | None = None) -> bool | str:
        return problem_or_true(parse_strengths, DIRECTION_ID, strengths)

    @classmethod
    def execute(cls, conditioning, toward, away_from, strengths: str, mode: str, latent: dict) -> io.NodeOutput:
        values = parse_strengths(DIRECTION_ID, strengths)
        cond_to, extras_to = _single_entry(DIRECTION_ID, "toward", toward)
        cond_from, extras_from = _single_entry(DIRECTION_ID, "away_from", away_from)
        try:
            direction = token_direction(cond_to[:1], cond_from[:1], mode)
        except ValueError as e:
            raise ProbeSelectError(DIRECTION_ID, str(e),
                                   "use mode 'mean', or encode both prompts with the same text encoder.") from None
        pooled_direction = None
        if extras_to.get("pooled_output") is not None and extras_from.get("pooled_output") is not None:
            pooled_direction = extras_to["pooled_output"][:1] - extras_from["pooled_output"][:1]
        moved = []
        for cond, extras in conditioning:
            try:
                batch = apply_direction(cond, direction, values)
            except ValueError as e:
                raise ProbeSelectError(DIRECTION_ID, str(e), "use mode 'mean' for prompts of different lengths.") from None
            new_extras = dict(extras)
            if pooled_direction is not None and extras.get("pooled_output") is not None:
                base = extras["pooled_output"][:1]
                new_extras["pooled_output"] = torch.cat([base + s * pooled_direction.to(base) for s in values])
            moved.append([batch, new_extras])
        samples = latent["samples"]
        if samples.shape[0] != 1:
            raise ProbeSelectError(DIRECTION_ID, f"the latent has a batch of {samples.shape[0]}.",
                                   "give a batch-1 latent; it is repeated once per strength.")
        latent_out = _plain_latent(latent)
        latent_out["samples"] = samples.repeat(len(values), *([1] * (samples.ndim - 1)))
        # one batch index for every row: ComfyUI then draws the same noise (the seed's batch-1 noise) for each
        latent_out["batch_index"] = [0] * len(values)
        text = f"{len(values)} rows, strengths {values}, mode {mode}"
        return io.NodeOutput(moved, latent_out, ui=ui.PreviewText(text))


LATENT_PROBING_NODES: list[type[io.ComfyNode]] = [ProbeSelectLatentSlerp, ProbeSelectConditioningDirection]
