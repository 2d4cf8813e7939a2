"""Split sampling nodes: ProbeSelectEarlySampler, ProbeSelectResume, and the one-box ProbeSelectSampler."""
from __future__ import annotations

import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..probes.checkpoints import checkpoint_step
from ..probes.pruning import PruningSchedule
from .engine import gallery, split_sampling, stages
from .engine.capture import find_tap
from .engine.selection import score_or_fail, scores_text, top_k_or_fail
from .errors import ProbeSelectError, problem_or_true
from .engine.families import model_family
from .engine.noise import UNSPLITTABLE_SAMPLERS, splittable_samplers
from .engine.noise_levels import model_noise_level
from .nodes_tap import apply_tap
from .types import CATEGORY, Activations, Probe, Scores

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_CANDIDATES = 4096
MIN_STEPS, MAX_STEPS = 2, 10000


def _progress(total: int):
    bar = comfy.utils.ProgressBar(total)
    return lambda step, _total: bar.update_absolute(step, total)


def check_split_numbers(node_id: str, seed: int, candidates: int, steps: int, checkpoint: float) -> int:
    """Check the numbers of a split run (no tensors needed: also run by ``validate_inputs``, which
    replaces ComfyUI's own min/max checks of these inputs); returns the stop step s."""
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise ProbeSelectError(node_id, f"candidates is {candidates}.",
                               f"set candidates (N) between 1 and {MAX_CANDIDATES}.")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ProbeSelectError(node_id, f"steps is {steps}; a split run needs {MIN_STEPS} to {MAX_STEPS}.",
                               "change steps.")
    if not 0 <= seed <= MAX_SEED:
        raise ProbeSelectError(node_id, f"seed {seed} is outside 0..{MAX_SEED}.", "use a seed in that range.")
    if not 0.0 < checkpoint < 1.0:
        raise ProbeSelectError(node_id, f"checkpoint_percent {checkpoint} is outside (0, 1).",
                               "use a ratio such as 0.2 (20% of the steps).")
    s = checkpoint_step(steps, checkpoint)
    if s <= 0 or s >= steps:
        raise ProbeSelectError(
            node_id, f"checkpoint_percent {checkpoint} of {steps} steps rounds to step {s}, so there is no "
                     "early phase or nothing left to finish.",
            f"pick a ratio whose step lies between 1 and {steps - 1} (e.g. {max(1, round(0.2 * steps)) / steps:.2f}) "
            "or use more steps.")
    if seed + candidates - 1 > MAX_SEED:
        raise ProbeSelectError(node_id, f"seed {seed} + {candidates} candidates overflows the seed range.",
                               "use a smaller seed.")
    return s


def validate_early(node_id: str, latent: dict, candidates: int, steps: int, checkpoint: float, sampler_name: str,
                   seed: int) -> int:
    """Check what a split run needs; returns the stop step s."""
    s = check_split_numbers(node_id, seed, candidates, steps, checkpoint)
    if sampler_name in UNSPLITTABLE_SAMPLERS:
        raise ProbeSelectError(node_id, f"sampler {sampler_name} chooses its own steps and can't stop at a checkpoint.",
                               "use another sampler (euler, dpmpp_2m, ...).")
    batch = latent["samples"].shape[0]
    if batch not in (1, candidates):
        raise ProbeSelectError(node_id, f"the latent has a batch of {batch}, but {candidates} candidates were asked for.",
                               "give a batch-1 latent (it is repeated for every candidate) or one row per candidate.")
    return s


def validate_split_inputs(node_id: str, seed: int | None, candidates: int | None, steps: int | None,
                          checkpoint: float | None) -> bool | str:
    """``validate_inputs`` of the split-run nodes (a linked input, None here, is checked by ``execute``)."""
    return problem_or_true(check_split_numbers, node_id, seed, candidates, steps, checkpoint)


def early_inputs():
    return [
        io.Model.Input("model", tooltip="Put ProbeSelectTap before this node to capture activations for a probe."),
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Latent.Input("latent_image", tooltip="Batch 1 (repeated for every candidate) or one row per candidate."),
        io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                     tooltip="Candidate i uses seed + i: a plain KSampler with that seed reproduces it."),
        io.Int.Input("candidates", default=5, min=1, max=MAX_CANDIDATES, tooltip="N, the number of seeds started."),
        io.Int.Input("steps", default=20, min=MIN_STEPS, max=MAX_STEPS),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Combo.Input("sampler_name", options=splittable_samplers(), default="euler"),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
        io.Float.Input("checkpoint_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps run for every candidate before scoring (0.2 = 20%; "
                               "0.2 of 6 steps stops at step 1, t = 1/6)."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
    ]


class ProbeSelectEarlySampler(io.ComfyNode):
    NODE_ID = "ProbeSelectEarlySampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Early Sampler",
            category=CATEGORY,
            description="Runs N candidate seeds to the checkpoint step in one batch. Outputs the early latents "
                        "(with what ProbeSelectResume needs to finish them), the x0 prediction at the checkpoint "
                        "for previews, and the tapped activations.",
            inputs=early_inputs(),
            outputs=[
                io.Latent.Output(display_name="early latent"),
                io.Latent.Output(display_name="x0 preview"),
                Activations.Output(display_name="activations"),
            ],
        )

    @classmethod
    def validate_inputs(cls, seed: int | None = None, candidates: int | None = None, steps: int | None = None,
                        checkpoint_percent: float | None = None) -> bool | str:
        return validate_split_inputs(cls.NODE_ID, seed, candidates, steps, checkpoint_percent)

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, seed: int, candidates: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, checkpoint_percent: float, denoise: float = 1.0) -> io.NodeOutput:
        s = validate_early(cls.NODE_ID, latent_image, candidates, steps, checkpoint_percent, sampler_name, seed)
        result = split_sampling.run_early(model, positive, negative, latent_image, seed, candidates, steps, cfg,
                                          sampler_name, scheduler, checkpoint_percent, denoise, callback=_progress(s))
        return early_output(model, result)


def checkpoint_text(result: split_sampling.EarlyResult) -> str:
    """The UI line of a stopped run: how many candidates, and the step, sigma and log-SNR it stopped at."""
    run = split_sampling.early_run(result.latent)
    return f"{len(run.seeds)} candidates at {result.noise_level.describe()}"


def early_output(model, result: split_sampling.EarlyResult) -> io.NodeOutput:
    """(early latent, x0 preview, activations) with the previews for the gallery and the checkpoint's noise level."""
    run = split_sampling.early_run(result.latent)
    previews = gallery.previews_payload(model, result.x0, run.run_id, run.seeds)
    return io.NodeOutput(result.latent, result.x0, result.activations,
                         ui={gallery.PREVIEWS_KEY: [previews], gallery.TEXT_KEY: [checkpoint_text(result)]})


def validate_resumable(node_id: str, latent: dict) -> split_sampling.EarlyRun:
    run = split_sampling.early_run(latent)
    if run is None:
        raise ProbeSelectError(node_id, "this LATENT did not come from ProbeSelectEarlySampler, so there is "
                                        "nothing to resume.",
                               "connect the 'kept' output of ProbeSelectTopK (or the early latent itself).")
    if run.version != split_sampling.METADATA_VERSION:
        raise ProbeSelectError(node_id, f"the latent's split-sampling metadata has version {run.version}, "
                                        f"this pack reads version {split_sampling.METADATA_VERSION}.",
                               "re-run the early sampler with this version of the pack.")
    if latent["samples"].shape[0] == 0:
        raise ProbeSelectError(node_id, "the latent has no rows to finish.", "keep at least one candidate (K >= 1).")
    return run


def until_step_or_fail(node_id: str, run: split_sampling.EarlyRun, until_percent: float) -> int:
    """The step ``until_percent`` of the run's steps lands on: the last step (finish) for 1.0, else a step
    after the candidates' own stop step and before the last."""
    if not 0.0 < until_percent <= 1.0:
        raise ProbeSelectError(node_id, f"until_percent {until_percent} is outside (0, 1].",
                               "use 1.0 to finish the candidates, or a later checkpoint such as 0.4.")
    if until_percent >= 1.0:
        return run.steps
    until = checkpoint_step(run.steps, until_percent)
    if until <= run.stop_step:
        raise ProbeSelectError(node_id, f"until_percent {until_percent} of {run.steps} steps lands on step {until}, "
                                        f"but the candidates are already at step {run.stop_step} "
                                        f"(t = {run.stop_step / run.steps:.3f}).",
                               f"use a later checkpoint (a step from {run.stop_step + 1} to {run.steps - 1}: "
                               f"until_percent {(run.stop_step + 1) / run.steps:.2f} or more), or 1.0 to finish.")
    if until >= run.steps:
        raise ProbeSelectError(node_id, f"until_percent {until_percent} of {run.steps} steps rounds to the last step.",
                               f"use 1.0 to finish, or a checkpoint whose step is below {run.steps} "
                               f"(until_percent {(run.steps - 1) / run.steps:.2f} or less).")
    return until


def _schedule_mismatch(node_id: str) -> ProbeSelectError:
    return ProbeSelectError(node_id, "this model's noise schedule differs from the one the candidates were started "
                                     "with.",
                            "give ProbeSelectResume the same model (and model patches such as ModelSamplingSD3 "
                            "shift) as the early sampler.")


def advance_or_fail(node_id: str, model, positive, negative, latent: dict, cfg: float,
                    until_step: int) -> split_sampling.EarlyResult:
    """Run the candidates of ``latent`` on to ``until_step`` (a later checkpoint), for another round of scoring."""
    run = validate_resumable(node_id, latent)
    try:
        return split_sampling.advance(model, positive, negative, latent, cfg, until_step,
                                      callback=_progress(until_step - run.stop_step))
    except split_sampling.FormMismatchError:
        raise ProbeSelectError(node_id, "these candidates were started by ProbeSelectEarlySamplerCustom.",
                               "run them on with ProbeSelectResumeCustom.") from None
    except split_sampling.ScheduleMismatchError:
        raise _schedule_mismatch(node_id) from None


def resume_or_fail(node_id: str, model, positive, negative, latent: dict, cfg: float) -> dict:
    run = validate_resumable(node_id, latent)
    try:
        return split_sampling.resume(model, positive, negative, latent, cfg,
                                     callback=_progress(run.steps - run.stop_step))
    except split_sampling.FormMismatchError:
        raise ProbeSelectError(node_id, "these candidates were started by ProbeSelectEarlySamplerCustom.",
                               "finish them with ProbeSelectResumeCustom.") from None
    except split_sampling.ScheduleMismatchError:
        raise _schedule_mismatch(node_id) from None


UNTIL_TOOLTIP = ("1.0 finishes the candidates. Less (e.g. 0.4) runs them on to that later checkpoint only, for another "
                 "round of ProbeSelectScore and ProbeSelectTopK (multi-stage pruning): the outputs are then an early "
                 "latent, its x0 preview and, with a tapped model, its activations.")


def until_percent_problem(node_id: str, until_percent: float | None) -> bool | str:
    """validate_inputs of the resume nodes: True, or the message for an until_percent outside (0, 1]."""
    if until_percent is not None and not 0.0 < until_percent <= 1.0:
        return str(ProbeSelectError(node_id, f"until_percent {until_percent} is outside (0, 1].",
                                    "use 1.0 to finish the candidates, or a later checkpoint such as 0.4."))
    return True


def resume_outputs() -> list:
    return [io.Latent.Output(display_name="latent", tooltip="Finished (until_percent 1.0), or stopped at the later "
                                                            "checkpoint like the early sampler's early latent."),
            io.Latent.Output(display_name="x0 preview", tooltip="The x0 prediction at the later checkpoint; the "
                                                                "finished latent when finishing."),
            Activations.Output(display_name="activations", tooltip="At the later checkpoint, when the model is "
                                                                   "tapped (ProbeSelectTap); none when finishing.")]


class ProbeSelectResume(io.ComfyNode):
    NODE_ID = "ProbeSelectResume"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Resume",
            category=CATEGORY,
            description="Finishes the kept candidates from their checkpoint. Steps, sampler, scheduler, seeds and "
                        "noise state come from the latent, so they always match the early run.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent", tooltip="The kept output of ProbeSelectTopK."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("until_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip=UNTIL_TOOLTIP),
            ],
            outputs=resume_outputs(),
        )

    @classmethod
    def validate_inputs(cls, until_percent: float | None = None) -> bool | str:
        return until_percent_problem(cls.NODE_ID, until_percent)

    @classmethod
    def execute(cls, model, positive, negative, latent: dict, cfg: float, until_percent: float = 1.0) -> io.NodeOutput:
        node_id = cls.NODE_ID
        run = validate_resumable(node_id, latent)
        until = until_step_or_fail(node_id, run, until_percent)
        if until >= run.steps:
            finished = resume_or_fail(node_id, model, positive, negative, latent, cfg)
            return io.NodeOutput(finished, finished, None)
        return early_output(model, advance_or_fail(node_id, model, positive, negative, latent, cfg, until))


SCHEDULE_TOOLTIP = ("Optional multi-stage pruning: stages 'checkpoint->K, ...', e.g. '0.2->8, 0.4->2' = keep the "
                    "best 8 at 20% of the steps, the best 2 of those at 40%, finish those 2 (N is candidates). "
                    "Empty: one stage, keep at checkpoint_percent. Each stage is scored by the connected probe "
                    "trained nearest its checkpoint (probe or later_probe), which must be within 0.1 of it.")


class ProbeSelectSampler(io.ComfyNode):
    """The whole pipeline in one box: early sampling, probe scoring, top-K (once or in stages), resume."""

    NODE_ID = "ProbeSelectSampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = early_inputs()
        inputs.insert(4, Probe.Input("probe", tooltip="From ProbeSelectLoadProbe. Its tap is applied to the model "
                                                       "automatically when the model has none."))
        inputs.insert(7, io.Int.Input("keep", default=1, min=1, max=MAX_CANDIDATES, tooltip="K, the candidates finished."))
        inputs += [
            io.String.Input("schedule", default="", optional=True, tooltip=SCHEDULE_TOOLTIP),
            Probe.Input("later_probe", optional=True,
                        tooltip="Optional: a probe trained at a later checkpoint (same block as probe), for the later "
                                "stages of a schedule."),
        ]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Sampler (N -> K)",
            category=CATEGORY,
            description="Runs N seeds to the checkpoint, scores them with the probe, and finishes only the best K; "
                        "with a schedule, prunes in stages (score, keep K, run on to the next checkpoint) before "
                        "finishing.",
            inputs=inputs,
            outputs=[
                io.Latent.Output(display_name="finished latent"),
                Scores.Output(display_name="scores", tooltip="The last stage's scores."),
                io.String.Output(display_name="kept seeds"),
            ],
        )

    @classmethod
    def validate_inputs(cls, seed: int | None = None, candidates: int | None = None, steps: int | None = None,
                        checkpoint_percent: float | None = None, schedule: str | None = None) -> bool | str:
        if schedule is None or not schedule.strip():
            return validate_split_inputs(cls.NODE_ID, seed, candidates, steps, checkpoint_percent)
        # With a schedule, its stages replace keep and checkpoint_percent.
        return problem_or_true(check_schedule, cls.NODE_ID, seed, candidates, steps, schedule)

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, probe, seed: int, candidates: int, keep: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, checkpoint_percent: float,
                denoise: float = 1.0, schedule: str = "", later_probe=None) -> io.NodeOutput:
        node_id = cls.NODE_ID
        if not (schedule or "").strip():      # one stage: the checks (and messages) of the early sampler first
            validate_early(node_id, latent_image, candidates, steps, checkpoint_percent, sampler_name, seed)
        plan = stages.node_schedule(node_id, schedule, candidates, keep, checkpoint_percent)
        first = plan.stages[0].checkpoint
        stops = stages.schedule_steps(node_id, plan, steps, schedule)
        s = validate_early(node_id, latent_image, candidates, steps, first, sampler_name, seed)
        probes = [probe] + ([later_probe] if later_probe is not None else [])
        stages.check_probes_share_the_tap(node_id, probe, later_probe)
        stage_probes = [stages.probe_for_stage(node_id, probes, number, step, steps)
                        for number, step in enumerate(stops, start=1)]
        family = model_family(model)
        if probe.metadata.backbone_family != family:
            # Checked before tapping: the probe's block may not exist (or mean something else) in this model.
            raise ProbeSelectError(
                node_id, f"probe '{probe.name}' was trained on {probe.metadata.backbone_family} activations "
                         f"(block {probe.metadata.tap}), but this model is {family}.",
                f"load a probe trained for {family} in ProbeSelectLoadProbe, or connect a "
                f"{probe.metadata.backbone_family} model.")
        tapped = model
        tap = find_tap(model)
        if tap is None or tap.path != probe.metadata.tap:
            tapped = apply_tap(model, probe.metadata.tap, probe.metadata.feature_shape[-1], node_id,
                               fix=f"load a probe trained for this {family} model in ProbeSelectLoadProbe.")
        early = split_sampling.run_early(tapped, positive, negative, latent_image, seed, candidates, steps, cfg,
                                         sampler_name, scheduler, first, denoise, callback=_progress(s))

        def score(number, activations, _latent):
            chosen = stage_probes[number - 1]
            return score_or_fail(node_id, chosen, activations, None), chosen.name

        def keep_best(latent, scores, k):
            kept, _pruned, indices = top_k_or_fail(node_id, latent, scores, k)
            return kept, indices

        kept, records = stages.run_stages(
            node_id, plan, stops, steps, early, score, keep_best,
            lambda latent, step: advance_or_fail(node_id, tapped, positive, negative, latent, cfg, step))
        finished = resume_or_fail(node_id, model, positive, negative, kept, cfg)
        last = records[-1]
        kept_seeds = ",".join(str(seed) for seed in last.kept_seeds)
        first_scores = records[0].scores
        previews = gallery.previews_payload(model, early.x0, first_scores.run_id, first_scores.seeds)
        text = (scores_text(first_scores, records[0].kept) if len(records) == 1 and not (schedule or "").strip()
                else stages.stages_text(records, scores_text))
        text = f"{checkpoint_text(early)}\n{text}"
        shown = gallery.selection_ui(text, gallery.staged_gallery_payload(records), previews)
        return io.NodeOutput(finished, last.scores, kept_seeds, ui=shown)


def check_schedule(node_id: str, seed: int, candidates: int, steps: int, schedule: str) -> PruningSchedule:
    """The checks of a ProbeSelectSampler schedule that need no tensors (``validate_inputs``)."""
    plan = stages.node_schedule(node_id, schedule, candidates, 1, 0.5)
    stages.schedule_steps(node_id, plan, steps, schedule)
    check_split_numbers(node_id, seed, candidates, steps, plan.stages[0].checkpoint)
    return plan


def parse_checkpoints(node_id: str, text: str, steps: int) -> list[int]:
    """'0.1, 0.2' -> checkpoint steps [round(0.1*T), round(0.2*T)], each strictly inside (0, T)."""
    try:
        ratios = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ProbeSelectError(node_id, f"checkpoints '{text}' is not a list of numbers.",
                               "write ratios separated by commas, e.g. 0.1,0.2,0.3,0.4,0.6.") from None
    if not ratios:
        raise ProbeSelectError(node_id, "no checkpoints given.", "write ratios such as 0.1,0.2,0.3,0.4,0.6.")
    result = []
    for ratio in ratios:
        k = checkpoint_step(steps, ratio)
        if not 0.0 < ratio < 1.0 or not 0 < k < steps:
            raise ProbeSelectError(node_id, f"checkpoint {ratio} of {steps} steps rounds to step {k}, outside "
                                            f"1..{steps - 1}.", "use ratios inside (0, 1), or more steps.")
        result.append(k)
    if len(set(result)) != len(result):
        raise ProbeSelectError(node_id, f"checkpoints {ratios} round to the same step with {steps} steps "
                                        f"({result}).", "use more steps or ratios further apart.")
    return sorted(result)


class ProbeSelectCollectSampler(io.ComfyNode):
    """Full runs of N seeds that also record the tap at several checkpoints: the data for training."""

    NODE_ID = "ProbeSelectCollectSampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [i for i in early_inputs() if i.id != "checkpoint_percent"]
        inputs.insert(-1, io.String.Input("checkpoint_percents", default="0.1,0.2,0.3,0.4,0.6",
                                          tooltip="Ratios of the steps at which activations are recorded, "
                                                  "so one dataset serves probes for any of them."))
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Collect Sampler",
            category=CATEGORY,
            description="Finishes all N candidates (seed + i each, like the early sampler) and records the tapped "
                        "block at several checkpoints, for ProbeSelectDatasetWriter.",
            inputs=inputs,
            outputs=[io.Latent.Output(display_name="finished latent"),
                     Activations.Output(display_name="activations")],
        )

    @classmethod
    def validate_inputs(cls, seed: int | None = None, candidates: int | None = None, steps: int | None = None,
                        checkpoint_percents: str | None = None) -> bool | str:
        # The split numbers with a checkpoint that is always valid (this node runs to the end), then the list.
        checked = validate_split_inputs(cls.NODE_ID, seed, candidates, steps, 0.5)
        return checked if checked is not True else problem_or_true(parse_checkpoints, cls.NODE_ID,
                                                                    checkpoint_percents, steps)

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, seed: int, candidates: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, checkpoint_percents: str, denoise: float = 1.0) -> io.NodeOutput:
        node_id = cls.NODE_ID
        validate_early(node_id, latent_image, candidates, steps, 0.5, sampler_name, seed)
        capture_at = parse_checkpoints(node_id, checkpoint_percents, steps)
        if find_tap(model) is None:
            raise ProbeSelectError(node_id, "the model has no activation tap, so nothing would be recorded.",
                                   "insert ProbeSelectTap between the model loader and this node.")
        sigmas = split_sampling.full_sigmas(model, steps, sampler_name, scheduler, denoise)
        levels = "\n".join(f"checkpoint {model_noise_level(model, sigmas, k).describe()}" for k in capture_at)
        result = split_sampling.run_candidates(model, positive, negative, latent_image, seed, candidates, steps, cfg,
                                               sampler_name, scheduler, stop_step=steps, capture_at=capture_at,
                                               denoise=denoise, callback=_progress(steps))
        return io.NodeOutput(result.latent, result.activations,
                             ui={gallery.TEXT_KEY: [f"{candidates} candidates recorded at\n{levels}"]})
