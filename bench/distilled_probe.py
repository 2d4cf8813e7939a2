"""A learned scorer without the decode: a probe on the x0 latent distilled from the evaluator's reading of the preview.

    .venv/bin/python bench/distilled_probe.py [--families unet dit] [--epochs 10]
        # -> bench/results/distilled_probe.{md,json}; probe files in bench/cache/proxy_bench/probes/;
        #    with a saved proxy bench run, its REPORT.md gains the distilled probe's rows (about 35 minutes for the UNet)
    .venv/bin/python bench/distilled_probe.py --families unet --epochs 6 --aside [--teacher later] [--text tokens]
        # a variant beside the saved run: one more row of distilled_probe.md's table of sets and teachers (also
        # --probe fine|wide|keypoints, --centred, --seed N); the probe reading the prompt's token features in order
        # (--text tokens) is the one that reads the evaluator's relation factor

The noise-aware preview (bench/preview_reward.py) ranks a prompt's seeds well at t = 0.2 (0.76 within-prompt on the
UNet) but decodes every candidate and runs the evaluator. The probes trained on the finished score alone reach 0.2-0.3
there, from one noisy number per row. This probe learns the preview's reading instead
(:mod:`probes.training.distillation`): the teacher is the evaluator's factors on the decoded x0 preview at two scales
(preview_reward's 18 features), computed offline for every recorded x0 latent of the training sets (the main set at
every checkpoint, the bulk set at 0.2 and 0.4, the early set at 0.1-0.4: candidates run only to 0.4, since the teacher
needs no finished image) and for its three flips, which the teacher labels afresh. One
time-conditioned probe (the pack's x0 branch with the prompt's FiLM) regresses all of them; a linear ranker over its
predicted readings, fit on the training prompts at each checkpoint, is folded into its head, giving one ordinary probe
file per checkpoint: the x0 latent and the prompt in, a score out, no decode and no evaluator at inference.

Everything is chosen on validation prompts held out of the training sets (the epoch: by the validation within-prompt
Spearman of the ranker at 0.2 and 0.4); the held-out prompts are only scored, by the saved probe files. At equal
compute the probe is priced as a probe, and its mix with the x0 preview as each stage's own scorer.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preview_reward  # noqa: E402
import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("distilled_probe")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAME = "distilled_probe"
CHECKPOINTS = (0.1, 0.2, 0.3, 0.4)     # where a cut could pay; one folded probe file each
VALIDATION_AT = (0.2, 0.4)             # the default schedule's cuts: the epoch is chosen on their mean
VALIDATION_SHARE = 0.15                # of the training prompts, held out of the fit to choose the epoch
TEACHER_SCALES = 2                     # preview_reward's reads: the x0 latent as stored, and pooled 2x2 once more
VIEWS = 4                              # the latent and its flips (probes.training.distillation.FLIP_VIEWS)
LATER_AT = 0.4                         # the later teacher reads the candidate's preview here (the early set's last)
TEACHERS = {"now": "the preview at the row's own checkpoint",
            "later": "the preview at the row's own checkpoint and the same candidate's at t = 0.4"}
# What the probe reads of the prompt (--text). A pooled embedding that is a mean over the token features (the DiT's,
# and the UNet's until its sets were collected again with proxy_world.models.TEXT_POOLING "tokens") is nearly blind
# to word order ("a yellow cross below a red cross" and "a red cross below a yellow cross" lie 0.04 apart, two
# prompts typically 4.3): a probe reading it cannot tell which object belongs where, so it cannot read the
# evaluator's relation factor. The token features, flattened in order, are the conditioning's own context tensor (no
# extra model run); the UNet's conditioning now carries them as its pooled output too (named_variant).
PROMPT_TEXTS = {"pooled": "the pooled prompt embedding the dataset stores (what the pack reads from the conditioning; "
                          "the UNet's is its token features in order, the DiT's a projection of their mean)",
                "tokens": "the prompt's token features flattened in order (the conditioning's context, word order kept)"}
EPOCHS = 10                            # at most: validation picks the epoch
PROBE = dict(inputs=("x0",), x0_size=16, text_film=True, x0_stem_width=48, x0_widths=(96, 160), embed_dim=128,
             mlp_hidden=256, head_hidden=(128,), pooled_size=4, attention=False)
# Other shapes of the distilled probe (--probe), to ask whether the probe's reading of the latent is what limits it:
# "fine" keeps where each shape sits (the relations the evaluator reads), "wide" has more channels throughout,
# "keypoints" reads where 8 text-conditioned maps of the full grid peak (the evaluator's relation compares the
# centroids of two objects). None of them read the relation: the prompt the probe read was the limit (PROMPT_TEXTS).
PROBE_SHAPES = {"default": "the report's", "fine": "the x0 branch's 8x8 grid read whole (one down block)",
                "wide": "about 1.8 times the default's channels",
                "keypoints": "the default reading where 8 text-conditioned maps of the full grid peak"}
PROBES = {"default": PROBE,
          "fine": {**PROBE, "x0_widths": (96,), "pooled_size": 8},
          "wide": {**PROBE, "x0_stem_width": 64, "x0_widths": (128, 224), "embed_dim": 192, "mlp_hidden": 384,
                   "head_hidden": (192,)},
          "keypoints": {**PROBE, "x0_keypoints": 8}}


_TEXT_ENCODERS: dict = {}


def prompt_text(dataset, family: str, text: str) -> torch.Tensor:
    """``[rows, D]``: what a probe reading ``text`` (one of PROMPT_TEXTS) reads of each row's prompt."""
    if text not in PROMPT_TEXTS:
        raise ValueError(f"text must be one of {sorted(PROMPT_TEXTS)}, got {text!r}")
    if text == "pooled":
        return dataset.text_embedding.float()
    if family not in _TEXT_ENCODERS:
        from bench.proxy_world import models
        _TEXT_ENCODERS[family] = models.load(family)[1]
    prompts = list(dict.fromkeys(dataset.prompts))
    with torch.no_grad():
        context, _ = _TEXT_ENCODERS[family].encode(prompts)
    by_prompt = dict(zip(prompts, context.flatten(1).float()))
    return torch.stack([by_prompt[p] for p in dataset.prompts])


def teacher_readings(latent: torch.Tensor, prompts: list[str], family: str) -> torch.Tensor:
    """``[rows, VIEWS, 9 * TEACHER_SCALES]``: the evaluator's factors on the decoded preview of each view of each
    latent (preview_reward's features, both scales side by side)."""
    from probe_select.probes.training.distillation import flip_view
    views = []
    for view in range(VIEWS):
        flipped = flip_view(latent, view)
        views.append(np.concatenate([preview_reward.latent_features(flipped, prompts, family, coarser)[0]
                                     for coarser in range(TEACHER_SCALES)], 1))
    return torch.as_tensor(np.stack(views, 1), dtype=torch.float32)


class Rows:
    """Every training row at every checkpoint it was recorded at: x0 latent, checkpoint, prompt embedding, the
    teacher's readings, the finished score, and its group (one prompt of one dataset at one checkpoint)."""

    def __init__(self, parts: list[tuple]):
        self.x0, self.t, self.text, self.readings, self.final = (torch.cat([p[i] for p in parts]) for i in range(5))
        self.prompts = sum((p[5] for p in parts), [])
        keys = sum((p[6] for p in parts), [])
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        self.groups = np.array([index[key] for key in keys])

    @staticmethod
    def part(dataset, name: str, checkpoints, family: str, teacher: str = "now", text_kind: str = "pooled") -> tuple:
        """One dataset's rows; its finished scores NaN when it has none (the early set: the teacher needs none).

        ``teacher`` "later" adds, after the readings of each row's own preview, those of the same candidate's
        preview at LATER_AT (a row past it: its own again): what the candidate will look like there, a label far
        less noisy than the finished score and free wherever the candidate was run that far. ``text_kind``: what
        the probe reads of the prompt (one of PROMPT_TEXTS)."""
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {teacher!r}")
        if teacher == "later" and LATER_AT not in dataset.manifest.checkpoints:
            raise ValueError(f"{name}: the later teacher reads t = {LATER_AT:g}, which this set did not record "
                             f"(it has {list(dataset.manifest.checkpoints)})")
        x0, t, text, readings, final, prompts, keys = [], [], [], [], [], [], []
        finished = proxy_bench.EVALUATOR in dataset.manifest.evaluators
        latents, read = {}, {}      # each checkpoint's latents loaded and read once, whichever row asks first
        prompt_embedding = prompt_text(dataset, family, text_kind)

        def latent_at(at: float) -> torch.Tensor:
            if at not in latents:
                latents[at] = dataset.x0(at).float()
            return latents[at]

        def readings_at(at: float) -> torch.Tensor:
            if at not in read:
                read[at] = teacher_readings(latent_at(at), dataset.prompts, family)
            return read[at]

        for at in checkpoints:
            x0.append(latent_at(at))
            t.append(torch.full((len(dataset),), float(at)))
            text.append(prompt_embedding)
            readings.append(readings_at(at) if teacher == "now"
                            else torch.cat([readings_at(at), readings_at(max(at, LATER_AT))], -1))
            final.append(dataset.scores(proxy_bench.EVALUATOR).double() if finished
                         else torch.full((len(dataset),), float("nan"), dtype=torch.float64))
            prompts += list(dataset.prompts)
            keys += [f"{name}|{p}|{at:g}" for p in dataset.prompts]
        return (torch.cat(x0), torch.cat(t), torch.cat(text), torch.cat(readings), torch.cat(final), prompts, keys)

    def rows(self, mask: np.ndarray) -> dict:
        m = torch.as_tensor(mask)
        return {"x0": self.x0[m], "t": self.t[m], "text": self.text[m], "readings": self.readings[m],
                "final": self.final[m], "groups": self.groups[mask]}


def validation_split(prompts: list[str], final: np.ndarray) -> tuple[np.ndarray, np.ndarray, set]:
    """(fit rows, validation rows, validation prompts): VALIDATION_SHARE of the prompts that have finished scores
    (so the same prompts with or without the early set) are validation prompts; their rows with a finished score
    are the validation rows, and none of their rows, early ones included, is fit: validation judges prompts the
    probe never saw."""
    finished = np.isfinite(final)
    candidates = sorted(set(p for p, done in zip(prompts, finished) if done))
    chosen = set(np.random.default_rng(0).permutation(candidates)[: int(len(candidates) * VALIDATION_SHARE)].tolist())
    in_chosen = np.array([p in chosen for p in prompts])
    return ~in_chosen, in_chosen & finished, chosen


def preview_within(sets: list[tuple], chosen: set, at: float) -> float:
    """Within-prompt Spearman of the x0 preview at ``at`` on the validation rows (the finished rows of the ``chosen``
    prompts in ``sets``, ``[(name, dataset)]`` as Rows names them): the figure the probe's validation is set beside."""
    from probe_select.probes.training.metrics import within_prompt_spearman
    preview, final, keys = [], [], []
    for name, dataset in sets:
        mask = np.array([p in chosen for p in dataset.prompts])
        preview.append(dataset.scores(f"x0@{at:g}").double().numpy()[mask])
        final.append(dataset.scores(proxy_bench.EVALUATOR).double().numpy()[mask])
        keys += [f"{name}|{p}" for p, m in zip(dataset.prompts, mask) if m]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return float(within_prompt_spearman(np.concatenate(preview), np.concatenate(final),
                                        np.array([index[key] for key in keys])))


def predicted_readings(probe, x0: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A distilled probe's readings (teacher units) of many rows, in batches."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x0), 512):
            out.append(probe(None, t[i:i + 512], text[i:i + 512], x0=x0[i:i + 512]))
    return torch.cat(out).double() * probe.reading_std.double() + probe.reading_mean.double()


def ranker_within(probe, fit: dict, judge: dict, at: float) -> float:
    """Within-prompt Spearman on ``judge``'s rows at checkpoint ``at`` of the linear ranker fit on ``fit``'s rows
    there, both over the probe's predicted readings."""
    from probe_select.probes.training.distillation import fit_linear_ranker
    from probe_select.probes.training.metrics import within_prompt_spearman
    f, j = (fit["t"] == at) & fit["final"].isfinite(), judge["t"] == at
    ranker = fit_linear_ranker(predicted_readings(probe, fit["x0"][f], fit["t"][f], fit["text"][f]),
                               fit["final"][f], torch.as_tensor(fit["groups"][f.numpy()]))
    scores = ranker(predicted_readings(probe, judge["x0"][j], judge["t"][j], judge["text"][j]))
    return within_prompt_spearman(scores.numpy(), judge["final"][j].numpy(), judge["groups"][j.numpy()])


DIAGNOSED_AT = (0.1, 0.2, 0.4)          # where reading_diagnosis swaps the teacher's own readings in


def reading_diagnosis(probe, fit: dict, judge: dict, judge_all: dict) -> dict:
    """What of its teacher a distilled probe reads, on the validation prompts.

    ``r2``: {reading: within-prompt R^2 of the probe's prediction of it (both centred on their prompt's mean at that
    checkpoint) over ``judge_all``'s rows (every row of the validation prompts, early ones too)}. ``swapped``:
    {t: {factor: within-prompt Spearman, on ``judge``'s rows, of the ranker fit on ``fit``'s over the probe's
    readings with that factor's (both scales) swapped for the teacher's own; "none" and "all" too}}: how much of
    the gap to the teacher each factor holds. Only the readings of the row's own checkpoint are swapped."""
    from probe_select.probes.training.distillation import centre_within_groups, fit_linear_ranker
    from probe_select.probes.training.metrics import within_prompt_spearman
    names = preview_reward.feature_names(TEACHER_SCALES)
    own = len(names)                    # a later teacher's readings follow the row's own
    truth = judge_all["readings"][:, 0, :own].double()
    predicted = predicted_readings(probe, judge_all["x0"], judge_all["t"], judge_all["text"])[:, :own]
    groups = judge_all["groups"]
    truth, predicted = centre_within_groups(truth, groups), centre_within_groups(predicted, groups)
    r2 = 1 - ((predicted - truth) ** 2).sum(0) / (truth ** 2).sum(0).clamp(min=1e-12)
    swaps = {"none": [], **{f: [n for n in names if preview_reward.factor_of(n) == f] for f in preview_reward.FEATURES},
             "all": list(names)}
    swapped = {}
    for at in DIAGNOSED_AT:
        f, j = (fit["t"] == at) & fit["final"].isfinite(), judge["t"] == at
        if not (bool(f.any()) and bool(j.any())):
            continue
        readings = {"fit": predicted_readings(probe, fit["x0"][f], fit["t"][f], fit["text"][f]),
                    "judge": predicted_readings(probe, judge["x0"][j], judge["t"][j], judge["text"][j])}
        teacher = {"fit": fit["readings"][f][:, 0].double(), "judge": judge["readings"][j][:, 0].double()}
        swapped[f"{at:g}"] = {}
        for label, columns in swaps.items():
            index = [names.index(c) for c in columns]
            mixed = {side: readings[side].clone() for side in readings}
            for side in mixed:
                mixed[side][:, index] = teacher[side][:, index]
            ranker = fit_linear_ranker(mixed["fit"], fit["final"][f], torch.as_tensor(fit["groups"][f.numpy()]))
            swapped[f"{at:g}"][label] = within_prompt_spearman(ranker(mixed["judge"]).numpy(),
                                                               judge["final"][j].numpy(), judge["groups"][j.numpy()])
    return {"r2": dict(zip(names, (round(float(v), 4) for v in r2))),
            "swapped": {t: {k: round(float(v), 4) for k, v in row.items()} for t, row in swapped.items()}}


def folded_probes(family: str, probe, rows: Rows, dataset_meta, out_dir: Path, training: dict) -> dict:
    """One probe file per checkpoint: the ranker fit on every training row there, folded into the probe's head,
    its output mapped (least squares) onto the finished score's z-score. {t: path}."""
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.training.distillation import fit_linear_ranker, fold_ranker
    every = rows.rows(np.isfinite(rows.final.numpy()))       # the rows with a finished score
    mean, std = float(every["final"].mean()), float(every["final"].std())
    paths = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for at in CHECKPOINTS:
        here = every["t"] == at
        if not bool(here.any()):
            continue
        readings = predicted_readings(probe, every["x0"][here], every["t"][here], every["text"][here])
        ranker = fit_linear_ranker(readings, every["final"][here], torch.as_tensor(every["groups"][here.numpy()]))
        score = ranker(readings).numpy()
        z = (every["final"][here].numpy() - mean) / std
        scale, shift = np.polyfit(score, z, 1)
        folded = fold_ranker(probe, ranker, scale=max(float(scale), 1e-3), shift=float(shift))
        meta = ProbeMetadata(backbone_family=dataset_meta.backbone_family, tap=dataset_meta.tap, checkpoint_t=at,
                             feature_shape=tuple(dataset_meta.feature_shape), pooling=dataset_meta.pooling,
                             evaluator=proxy_bench.EVALUATOR, score_mean=mean, score_std=std, config=folded.config,
                             training={**training, "ranker_weights": [round(float(w), 4) for w in ranker.weights]})
        paths[at] = save_probe(out_dir / f"{family}_{NAME}_t{at:g}.safetensors", folded, meta)
    return paths


def datasets(family: str, cache: Path) -> tuple:
    """The main training set, the bulk and early sets where collected (else None), the held-out set."""
    from probe_select.probes.training.dataset import ProbeDataset
    train, held = ProbeDataset(cache / f"{family}_train"), ProbeDataset(cache / f"{family}_heldout")
    bulk, early = (ProbeDataset(cache / f"{family}_{name}") if (cache / f"{family}_{name}" / "manifest.json").exists()
                   else None for name in ("bulk", "early"))
    seen = set(train.prompts).union(*(d.prompts for d in (bulk, early) if d is not None))
    if set(held.prompts) & seen:
        raise ValueError(f"{family}: held-out prompts are among the training prompts")
    return train, bulk, early, held


@dataclass(frozen=True)
class Variant:
    """How a run distils, its training sets aside; the defaults are the report's run. ``teacher``: one of TEACHERS;
    ``probe``: one of PROBES; ``centred``: the probe learns the teacher's readings less their prompt's mean at each
    checkpoint (:func:`~probes.training.distillation.centre_within_groups`); ``seed``: the distillation's;
    ``text``: what it reads of the prompt, one of PROMPT_TEXTS."""

    teacher: str = "now"
    probe: str = "default"
    centred: bool = False
    seed: int = 0
    text: str = "pooled"

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {self.teacher!r}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {sorted(PROBES)}, got {self.probe!r}")
        if self.text not in PROMPT_TEXTS:
            raise ValueError(f"text must be one of {sorted(PROMPT_TEXTS)}, got {self.text!r}")

    @classmethod
    def of(cls, training: dict) -> "Variant":
        """The variant a run's training record names (runs from before the later teacher stored the readings' names
        under "teacher"; runs from before the other fields were the defaults)."""
        teacher = training.get("teacher", "now")
        return cls(teacher=teacher if isinstance(teacher, str) else "now", probe=training.get("probe", "default"),
                   centred=bool(training.get("centred", False)), seed=int(training.get("seed", 0)),
                   text=training.get("text", "pooled"))

    def words(self) -> list[str]:
        """What sets it apart from the defaults, in words ([] for the report's run)."""
        return ([f"{self.teacher} teacher"] if self.teacher != "now" else []) \
            + ([f"{self.probe} probe"] if self.probe != "default" else []) \
            + (["centred readings"] if self.centred else []) \
            + ([f"{self.text} text"] if self.text != "pooled" else []) \
            + ([f"seed {self.seed}"] if self.seed else [])


def named_variant(variant: Variant, family: str) -> Variant:
    """The variant as a run is named and recorded: reading the pooled output of a family whose conditioning carries
    the token features there (the UNet's, bench/proxy_world/models.TEXT_POOLING) is reading the tokens text, so its
    probe folder and entry stand apart from the runs on the earlier, mean-pooled sets."""
    from bench.proxy_world import models
    if variant.text == "pooled" and models.TEXT_POOLING[family] == "tokens":
        return replace(variant, text="tokens")
    return variant


def set_key(training: dict) -> str:
    """A run's entry in the record of training sets: its sets, and its variant unless the defaults."""
    words = Variant.of(training).words()
    return "+".join(training["sets"]) + (f" ({', '.join(words)})" if words else "")


def measure(family: str, cache: Path, epochs: int, reuse: bool = False, early_rows: bool = True,
            variant: Variant = Variant(), aside: bool = False) -> dict:
    """Distil, fold and judge one family's probe. ``aside``: its files go to a folder of their own under the cache's
    probes/ (named after the run's sets and variant), leaving the report's probe files alone."""
    from probe_select.probes.atomic import atomic_write
    from probe_select.probes.model import ProbeConfig, build_probe
    from probe_select.probes.training.distillation import (DistillConfig, centre_within_groups, distill_probe,
                                                           widen_head)
    started = time.perf_counter()
    train, bulk, early, held = datasets(family, cache)
    teacher = variant.teacher
    parts, sets = [Rows.part(train, "train", train.manifest.checkpoints, family, teacher, variant.text)], ["main"]
    for name, dataset in (("bulk", bulk), ("early", early if early_rows else None)):
        if dataset is not None:
            parts.append(Rows.part(dataset, name, [t for t in dataset.manifest.checkpoints if t in CHECKPOINTS],
                                   family, teacher, variant.text))
            sets.append(name)
    named = named_variant(variant, family)
    probe_dir = cache / "probes"
    if aside:
        probe_dir = probe_dir / "_".join([f"{family}_{NAME}_{'+'.join(sets)}"]
                                         + [word.replace(" ", "-") for word in named.words()])
    rows = Rows(parts)
    if variant.centred:     # each group is one prompt of one set at one checkpoint: what a within-prompt ranking compares
        rows.readings = centre_within_groups(rows.readings, rows.groups)
    fit_mask, is_val, chosen = validation_split(rows.prompts, rows.final.numpy())
    fit, val = rows.rows(fit_mask), rows.rows(is_val)
    unfinished = int((~np.isfinite(fit["final"].numpy())).sum())
    log.info("%s: %d training rows (%d without a finished score), %d validation rows (%d prompts), teacher read in "
             "%.0f s", family, int(fit_mask.sum()), unfinished, int(is_val.sum()), len(chosen),
             time.perf_counter() - started)
    manifest = train.manifest
    config = ProbeConfig(in_channels=manifest.feature_shape[0], feature_size=manifest.feature_shape[1],
                         x0_channels=manifest.x0_shape[0], text_dim=rows.text.shape[1], **PROBES[variant.probe])

    def validate(probe) -> float:
        figures = [ranker_within(probe, fit, val, at) for at in VALIDATION_AT]
        log.info("%s: validation within-prompt at %s: %s", family, VALIDATION_AT, [round(f, 4) for f in figures])
        return float(np.mean(figures))

    kept = probe_dir / f"{family}_{NAME}_readings.pt"     # the distilled probe before any ranker
    if reuse and kept.exists():
        state, history = torch.load(kept)
        probe = widen_head(build_probe(config), fit["readings"].shape[-1])
        for buffer in ("reading_mean", "reading_std"):
            probe.register_buffer(buffer, state[buffer])
        probe.load_state_dict(state)
        probe.eval()
        log.info("%s: reusing the distilled probe in %s", family, kept)
    else:
        probe, history = distill_probe(config, fit["x0"], fit["t"], fit["text"], fit["readings"],
                                       DistillConfig(epochs=epochs, seed=variant.seed), validate)
        kept.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(kept, lambda temp: torch.save((probe.state_dict(), history), temp))
    best = max(history, key=lambda h: h["validation"])
    # the chosen probe's ranker and the x0 preview on the same validation rows: what the demo's scorer is chosen by
    finished = [("train", train)] + ([("bulk", bulk)] if bulk is not None else [])
    validation = {f"{at:g}": {NAME: ranker_within(probe, fit, val, at), "x0_preview": preview_within(finished, chosen, at)}
                  for at in VALIDATION_AT}
    training = {"method": f"distilled from the evaluator's factors on the decoded x0 preview ({TEACHERS[teacher]}"
                          + (", less their prompt's mean" if variant.centred else "") + "), then a linear ranker",
                **asdict(named),
                "readings": list(preview_reward.feature_names(TEACHER_SCALES)), "views": VIEWS,
                "sets": sets, "train_rows": int(fit_mask.sum()), "unfinished_rows": unfinished,
                "validation_rows": int(is_val.sum()), "epochs": epochs,
                "chosen_epoch": best["epoch"], "history": history, "checkpoints": list(CHECKPOINTS)}
    # the kept epoch's probe, its ranker refit on every training row (validation prompts too), one file a checkpoint
    paths = folded_probes(family, probe, rows, manifest, probe_dir, training)
    # the saved files score the held-out rows as the pack would (in evaluator units: same order as the z-scores)
    predictions, finals, groups = scored(held, paths, family, variant.text)
    heldout = {f"{at:g}": {name: proxy_bench.within_ci(predictions[name][at], finals, groups, 1000)
                           for name in (NAME, "x0_preview")} for at in paths}
    default = proxy_bench.equal_compute(family, proxy_bench.MEDIUM, predictions, finals, groups, NAME,
                                        mixes=((NAME, "x0_preview"),))
    anywhere = anywhere_figures(family, predictions, finals, groups)
    return {"training": training, "probe_files": {f"{at:g}": str(Path(p).relative_to(ROOT)) for at, p in paths.items()},
            "heldout": heldout, "validation": validation,
            "equal_compute": compact(default), "equal_compute_anywhere": compact(anywhere, curves=False),
            "confirmation": confirm_family(family, cache, anywhere, probe_dir, variant.text),
            "diagnosis": reading_diagnosis(probe, fit, val, rows.rows(~fit_mask)),
            "seconds": round(time.perf_counter() - started)}


def chosen_on_all(curves: dict, best_of_8: float) -> dict:
    """{method / scorer: its cheapest point whose reward on every held-out prompt reaches ``best_of_8``}: the
    schedule each method would ship with, chosen on the whole held-out set (oracle and random left out)."""
    chosen = {}
    for key, points in curves.items():
        reaching = [p for p in points if p["reward"] >= best_of_8]
        if reaching and "oracle" not in key and "random" not in key:
            chosen[key] = min(reaching, key=lambda p: p["compute"])
    return chosen


def kept_reward(key: str, schedule_text: str, scorers: dict, finals: np.ndarray, groups: np.ndarray) -> float:
    """Mean kept reward of method / scorer ``key`` (as proxy_bench.equal_compute names it; a mix 'A -> B' reads B at
    its last cut and A before) with one schedule, on another set's scores, as equal_compute draws its subsets."""
    from probe_select.probes.pruning import mean_kept_reward, parse_schedule
    schedule = parse_schedule(schedule_text)
    cuts = [stage.checkpoint for stage in schedule.stages]
    name = key.split(" / ", 1)[1] if " / " in key else None
    first, _, second = (name or "").partition(" -> ")
    columns = {t: scorers[second if second and t == cuts[-1] else first][t] for t in cuts}
    return mean_kept_reward(proxy_bench.prompt_tables(columns, finals, groups), schedule, proxy_bench.MEDIUM.steps,
                            draws=proxy_bench.EQUAL_COMPUTE_DRAWS)


def confirmation(anywhere: dict, scorers: dict, finals: np.ndarray, groups: np.ndarray) -> dict:
    """Every method's schedule chosen on the whole held-out set (:func:`chosen_on_all`) judged on the confirmation
    set: its reward there against best-of-8's there, at the compute it costs (the same on any prompts)."""
    bo8 = anywhere["best_of_8"]
    best_of_8 = kept_reward("best-of-N", bo8["schedule"], scorers, finals, groups)
    rows = {key: {"schedule": p["schedule"], "fraction": p["compute"] / bo8["compute"], "heldout": p["reward"],
                  "confirmation": kept_reward(key, p["schedule"], scorers, finals, groups)}
            for key, p in chosen_on_all(anywhere["curves"], bo8["reward"]).items()}
    return {"prompts": len(set(groups.tolist())), "best_of_8": {"heldout": bo8["reward"], "confirmation": best_of_8},
            "methods": dict(sorted(rows.items(), key=lambda item: item[1]["fraction"]))}


def probe_paths(family: str, probe_dir: Path) -> dict:
    """{t: the folded probe file of checkpoint t} that a run left in ``probe_dir``."""
    paths = {at: probe_dir / f"{family}_{NAME}_t{at:g}.safetensors" for at in CHECKPOINTS}
    return {at: path for at, path in paths.items() if path.exists()}


def scored(dataset, paths: dict, family: str, text: str = "pooled") -> tuple[dict, np.ndarray, np.ndarray]:
    """({scorer: {t: scores}} of the x0 preview and the saved probe files (reading ``text`` of the prompts),
    finished scores, prompt groups)."""
    prompt = None if text == "pooled" else prompt_text(dataset, family, text)
    scores = {"x0_preview": proxy_bench.preview_scores(dataset, tuple(paths)),
              NAME: {at: proxy_bench.heldout_predictions(path, dataset, at, prompt) for at, path in paths.items()}}
    groups = dataset.arrays(checkpoint_t=0.2, evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    return scores, dataset.scores(proxy_bench.EVALUATOR).double().numpy(), groups


def anywhere_figures(family: str, scores: dict, finals: np.ndarray, groups: np.ndarray) -> dict:
    """Equal compute on the held-out prompts cutting at any checkpoint, pair or triple of them."""
    return proxy_bench.equal_compute(family, proxy_bench.MEDIUM, scores, finals, groups, NAME,
                                     mixes=((NAME, "x0_preview"),), checkpoints=tuple(scores[NAME]), stages=3)


def confirm_family(family: str, cache: Path, anywhere: dict | None = None, probe_dir: Path | None = None,
                   text: str = "pooled") -> dict | None:
    """The confirmation set's verdict on the saved probe files (None when that set was not collected)."""
    from probe_select.probes.training.dataset import ProbeDataset
    where = cache / f"{family}_confirm"
    if not (where / "manifest.json").exists():
        return None
    paths = probe_paths(family, probe_dir or cache / "probes")
    if anywhere is None:
        anywhere = anywhere_figures(family, *scored(datasets(family, cache)[-1], paths, family, text))
    return confirmation(anywhere, *scored(ProbeDataset(where), paths, family, text))


def compact(eq: dict, curves: bool = True) -> dict:
    """proxy_bench.equal_compute's figures without the other scorers' curves (megabytes of points): every
    method's match and best reward at <= 0.5 of best-of-8's compute, and the distilled probe's own curves (none
    when ``curves`` is False)."""
    bo8 = eq["best_of_8"]["compute"]
    return {**{k: v for k, v in eq.items() if k != "curves"},
            "best_at_half": {key: proxy_bench.best_reward_at_half(points, bo8) for key, points in eq["curves"].items()},
            "curves": {key: points for key, points in eq["curves"].items() if curves and NAME in key}}


def scorer_rows(eq: dict) -> list[tuple]:
    """(method / scorer, [(fraction, schedule, reward, best-of-8's reward)] per half, best reward at <= 0.5)"""
    bo8 = eq["best_of_8"]["compute"]
    rows = []
    for key, half in eq["best_at_half"].items():
        if "oracle" in key or "random" in key:
            continue
        found = [(f["compute"] / bo8, f["schedule"], f["reward"], f["best_of_8"]) for f in eq["match_best_of_8"][key]]
        rows.append((key, found, half))
    return rows


def fraction_text(found: list) -> str:
    return " / ".join(f"{frac:.2f} ({schedule}: {reward:.3f} vs {bo8:.3f})" for frac, schedule, reward, bo8 in found) \
        if found else "never"


def markdown(results: dict, command: str) -> str:
    lines = ["# A probe distilled from the preview's reading (no decode, no evaluator at inference)", "",
             f"Command: `{command}`.", "", *__doc__.split("\n\n")[2:4], "",
             "Rows: " + "; ".join(f"{family} {r['training']['train_rows']} training rows "
                                  f"({r['training'].get('unfinished_rows', 0)} without a finished score) + "
                                  f"{r['training']['validation_rows']} validation rows (epoch {r['training']['chosen_epoch']} "
                                  f"of {r['training']['epochs']} chosen on them), {r['seconds']} s"
                                  for family, r in results.items()), "",
             "## Held-out within-prompt Spearman (95% bootstrap CI over prompts)", "",
             "| model | t | distilled probe | x0 preview |", "| --- | --- | --- | --- |"]
    for family, r in results.items():
        for at, figures in r["heldout"].items():
            d, p = figures[NAME], figures["x0_preview"]
            lines.append(f"| {family} | {at} | {d['within']:.3f} [{d['low']:.3f}, {d['high']:.3f}] | "
                         f"{p['within']:.3f} [{p['low']:.3f}, {p['high']:.3f}] |")
    lines += ["", "## More rows and other teachers", "",
              "Each combination of training sets and teacher measured (the newest run last; the early set: candidates "
              "stopped at t = 0.4, no finished image; half early: half its prompts, in the sets collected before the "
              "UNet's pooled output carried word order, so that runs without 'tokens text' read the mean-pooled "
              "embedding; the text: " + "; ".join(f"{k}, {v}" for k, v in PROMPT_TEXTS.items())
              + "; the later teacher: " + TEACHERS["later"] + "; the probe shapes: "
              + "; ".join(f"{k}, {v}" for k, v in PROBE_SHAPES.items() if k != "default") + "): training rows (of "
              "them without a finished score), the validation figure of the chosen epoch, held-out within-prompt "
              "Spearman at each checkpoint, and the fraction of best-of-8's compute at which the learned scorer "
              "matches it: two stages at 0.2 and 0.4 with the x0 preview at 0.4, the schedule chosen on one half of "
              "the held-out prompts, each way ('short': it falls short of best-of-8 on the other half); the cheapest "
              "method reading the probe, at any checkpoints, whose choice reaches best-of-8 on the other half both "
              "ways ('none': no such method); and the cheapest one whose choice on every held-out prompt reaches "
              "best-of-8 on the confirmation prompts ('none': no such method; '-': not judged there).", "",
              "| model | sets | training rows (unfinished) | validation | "
              + " | ".join(f"t = {t:g}" for t in CHECKPOINTS)
              + " | two stages -> x0 preview | cheapest anywhere | cheapest confirmed |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in CHECKPOINTS) + " | --- | --- | --- |"]
    commands = []
    for family, r in results.items():
        for sets, f in (r.get("by_sets") or {}).items():
            within = [f["heldout"].get(f"{t:g}", {}).get("within") for t in CHECKPOINTS]
            lines.append(f"| {family} | {sets} | {f['train_rows']} ({f['unfinished_rows']}) | {f['validation']:.3f} | "
                         + " | ".join("-" if w is None else f"{w:.3f}" for w in within) + " | "
                         + (" / ".join(f"{x:.2f}" + ("" if reached else " (short)") for x, reached in f["mix_match"])
                            or "never") + " | "
                         + (f"{' / '.join(f'{x:.2f}' for x in f['cheapest_anywhere']['fractions'])} "
                            f"({f['cheapest_anywhere']['method']})" if f["cheapest_anywhere"] else "none") + " | "
                         + confirmed_text(f) + " |")
            if f.get("command"):
                commands.append(f"- {family}, {sets}: `{f['command']}`")
    if commands:
        lines += ["", "Runs recorded here only (their probe files aside, the figures above this table untouched):", "",
                  *commands]
    lines += diagnosis_lines(results)
    for family, r in results.items():
        c = r.get("confirmation")
        if not c:
            continue
        lines += ["", f"## Confirmation on {c['prompts']} more held-out prompts ({family})", "",
                  "Each method's cheapest schedule (cutting anywhere, in up to three stages) whose mean kept reward on "
                  "all the held-out prompts above reaches best-of-8's there, judged on held-out prompts that no "
                  "choice saw (`proxy_bench.py --collect-only confirm`; as many seeds each, the same random subsets). "
                  f"Best-of-8 there: {c['best_of_8']['confirmation']:.4f} (on the held-out prompts "
                  f"{c['best_of_8']['heldout']:.4f}).", "",
                  "| method / scorer | schedule | fraction of best-of-8's compute | held-out | confirmation | "
                  "reaches best-of-8 there |", "| --- | --- | --- | --- | --- | --- |"]
        for key, m in c["methods"].items():
            lines.append(f"| {key} | {m['schedule']} | {m['fraction']:.2f} | {m['heldout']:.4f} | "
                         f"{m['confirmation']:.4f} | {'yes' if m['confirmation'] >= c['best_of_8']['confirmation'] else 'no'} |")
    lines += ["", "Validation (training prompts held out of the fit) per epoch, within-prompt Spearman at "
              f"{', '.join(map(str, VALIDATION_AT))} (mean):", ""]
    for family, r in results.items():
        lines.append(f"- {family}: " + ", ".join(f"{h['epoch']}: {h['validation']:.3f} (loss {h['loss']:.3f})"
                                               for h in r["training"]["history"]))
    for label, key in (("at the proxy bench's cuts (0.2, 0.4)", "equal_compute"),
                       (f"cutting at any of {', '.join(f'{t:g}' for t in CHECKPOINTS)}, any pair and any triple of them",
                        "equal_compute_anywhere")):
        lines += ["", f"## Equal compute, {label}", "",
                  "Compute to match best-of-8's mean kept reward, as a fraction of best-of-8's (the cheapest schedule "
                  "chosen on one half of the held-out prompts, judged on the other, both ways; in brackets its reward "
                  "against best-of-8's on that half), and the best reward at <= 0.5 of best-of-8's compute.", "",
                  "| model | method / scorer | compute to match best-of-8 | best reward at <= 0.5 (best-of-8) |",
                  "| --- | --- | --- | --- |"]
        for family, r in results.items():
            eq = r[key]
            for name, found, half in scorer_rows(eq):
                lines.append(f"| {family} | {name} | {fraction_text(found)} | {half:.4f} ({eq['best_of_8']['reward']:.4f}) |")
    return "\n".join(lines) + "\n"


def diagnosis_lines(results: dict) -> list[str]:
    """The section on what each diagnosed run reads of its teacher (:func:`reading_diagnosis`); [] when none is."""
    runs = [(family, sets, f["diagnosis"]) for family, r in results.items()
            for sets, f in (r.get("by_sets") or {}).items() if f.get("diagnosis")]
    if not runs:
        return []
    factors = preview_reward.FEATURES
    lines = ["", "## What the probe reads of its teacher", "",
             "Within-prompt R^2 of the probe's prediction of each of the teacher's readings (the preview as stored / "
             "pooled 2x2 once more; both centred on their prompt's mean at that checkpoint) on every row of the "
             "validation prompts:", "",
             "| model | sets | " + " | ".join(factors) + " |", "| --- | --- | " + " | ".join("---" for _ in factors) + " |"]
    for family, sets, d in runs:
        cells = (" / ".join(f"{d['r2'][n]:.2f}" for n in d["r2"] if preview_reward.factor_of(n) == factor)
                 for factor in factors)
        lines.append(f"| {family} | {sets} | " + " | ".join(cells) + " |")
    lines += ["", "The ranker over the probe's readings with one factor's readings (both scales) swapped for the "
              "teacher's own, within-prompt Spearman on the validation prompts' finished rows: how much of the gap "
              "to the teacher ('all') each factor holds.", "",
              "| model | sets | t | none | " + " | ".join(factors) + " | all |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in factors) + " | --- |"]
    for family, sets, d in runs:
        for at, row in d["swapped"].items():
            lines.append(f"| {family} | {sets} | {at} | {row['none']:.3f} | "
                         + " | ".join(f"{row[factor]:.3f}" for factor in factors) + f" | {row['all']:.3f} |")
    return lines


def set_figures(result: dict) -> dict:
    """What a run on one combination of training sets measured, in brief: its rows, the held-out within-prompt
    Spearman at every checkpoint and its matches of best-of-8: the two-stage mix at the bench's cuts ([fraction of
    best-of-8's compute, whether the schedule chosen on one half reaches best-of-8 on the other] each way), and the
    cheapest method reading the probe anywhere whose choice reaches best-of-8 on the other half both ways."""
    training, eq, anywhere = result["training"], result["equal_compute"], result["equal_compute_anywhere"]
    mix = f"{proxy_bench.two_stage_method(*VALIDATION_AT)} / {proxy_bench.mix_name(NAME, 'x0_preview')}"

    def matches(figures: dict, key: str) -> list:
        return [[f["compute"] / figures["best_of_8"]["compute"], f["reward"] >= f["best_of_8"]]
                for f in figures["match_best_of_8"].get(key, [])]

    learned = [key for key in anywhere["match_best_of_8"] if key.endswith(NAME) or NAME + " ->" in key]
    both_ways = {key: found for key in learned
                 if len(found := matches(anywhere, key)) == 2 and all(reached for _, reached in found)}
    cheapest = min(both_ways, key=lambda key: max(f for f, _ in both_ways[key]), default=None)
    figures = {**asdict(Variant.of(training)), "train_rows": training["train_rows"],
               "unfinished_rows": training.get("unfinished_rows", 0),
               "chosen_epoch": training["chosen_epoch"], "epochs": training["epochs"],
               "validation": max(h["validation"] for h in training["history"]),
               "heldout": {t: f[NAME] for t, f in result["heldout"].items()},
               "mix_match": matches(eq, mix),
               "cheapest_anywhere": {"method": cheapest, "fractions": [f for f, _ in both_ways[cheapest]]}
               if cheapest else {}}
    if result.get("diagnosis"):
        figures["diagnosis"] = result["diagnosis"]
    confirmation = result.get("confirmation")
    if confirmation:
        confirmed = cheapest_confirmed(confirmation, NAME)
        figures["confirmed"] = confirmed and {"method": confirmed["method"], "fraction": confirmed["fraction"]}
    return figures


def cheapest_confirmed(confirmation: dict, scorer: str) -> dict | None:
    """The cheapest method pruning by ``scorer`` (a mix 'A -> B' prunes by A and reads B at its last cut only) whose
    schedule, chosen on every held-out prompt, reaches best-of-8 on the confirmation prompts: ``{"method",
    "schedule", "fraction", "confirmation"}``; None: none does."""
    bar = confirmation["best_of_8"]["confirmation"]
    # methods come sorted by compute
    return next(({"method": key, **m} for key, m in confirmation["methods"].items()
                 if " / " in key and key.split(" / ", 1)[1].split(" -> ")[0] == scorer
                 and m["confirmation"] >= bar), None)


def by_sets(earlier: dict | None, result: dict) -> dict:
    """Every combination of training sets and teacher measured so far ('main+bulk', 'main+bulk+early', 'main+early
    (later teacher)'), this run's last: the learning curve of the distillation on more rows, and the variants tried.
    An earlier run of the same key is replaced; the saved run's own entry is always made from its figures."""
    kept = dict((earlier or {}).get("by_sets") or {})
    if earlier and "training" in earlier:     # the saved run: from its own figures
        kept[set_key(earlier["training"])] = set_figures(earlier)
    key = set_key(result["training"])
    kept.pop(key, None)
    return {**kept, key: set_figures(result)}


def confirmed_text(figures: dict) -> str:
    """A set_figures entry's confirmed schedule as its table cell ('-': not judged on the confirmation prompts)."""
    if "confirmed" not in figures:
        return "-"
    confirmed = figures["confirmed"]
    return "none" if confirmed is None else f"{confirmed['fraction']:.2f} ({confirmed['method']})"


def header_command(markdown_path: Path, fallback: str) -> str:
    """The command a saved figures page names (the run behind its main figures), else ``fallback``."""
    if markdown_path.exists():
        for line in markdown_path.read_text().splitlines():
            if line.startswith("Command: `") and line.endswith("`."):
                return line[len("Command: `"):-2]
    return fallback


def report_entry(result: dict) -> dict:
    """What the proxy bench's saved run keeps of it: the held-out figures and the equal-compute rows at its cuts."""
    eq = result["equal_compute"]
    keep = [key for key in eq["curves"] if NAME in key]
    entry = {"heldout": result["heldout"], "validation": result.get("validation", {}),
             "probe_files": result.get("probe_files", {}), "chosen_epoch": result["training"]["chosen_epoch"],
             "train_rows": result["training"]["train_rows"], "sets": result["training"]["sets"],
             "unfinished_rows": result["training"].get("unfinished_rows", 0),
             "equal_compute": {"curves": {k: eq["curves"][k] for k in keep},
                               "match_best_of_8": {k: eq["match_best_of_8"][k] for k in keep}}}
    confirmation = result.get("confirmation")
    if confirmation:
        entry["confirmation"] = {"prompts": confirmation["prompts"], "best_of_8": confirmation["best_of_8"],
                                 "cheapest": {scorer: cheapest_confirmed(confirmation, scorer)
                                              for scorer in (NAME, "x0_preview")}}
    return entry


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["unet"])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--cache", type=Path, default=proxy_bench.CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--confirm-only", action="store_true",
                        help="judge the saved probe files' schedules on the confirmation set (proxy_bench.py "
                             "--collect-only confirm) and rewrite the figures")
    parser.add_argument("--no-early-rows", action="store_true",
                        help="leave the early set out of the distillation (the main and bulk sets only)")
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="now",
                        help="what the probe learns to read: " + "; ".join(f"{k}: {v}" for k, v in TEACHERS.items()))
    parser.add_argument("--probe", choices=sorted(PROBES), default="default",
                        help="the distilled probe's shape: " + "; ".join(f"{k}: {v}" for k, v in PROBE_SHAPES.items()))
    parser.add_argument("--centred", action="store_true",
                        help="learn the teacher's readings less their prompt's mean at each checkpoint (what a "
                             "within-prompt ranking reads), not the readings themselves")
    parser.add_argument("--seed", type=int, default=0,
                        help="the distillation's seed (initial weights, order of rows, views): a second seed tells "
                             "how far two runs of one variant differ")
    parser.add_argument("--text", choices=sorted(PROMPT_TEXTS), default="pooled",
                        help="what the probe reads of the prompt: " + "; ".join(f"{k}: {v}" for k, v in PROMPT_TEXTS.items()))
    parser.add_argument("--aside", action="store_true",
                        help="record the run in the table of training sets and teachers only: its probe files in a "
                             "folder of their own, the report's probe files and figures left as they are")
    parser.add_argument("--reuse-distilled", action="store_true",
                        help="start from the distilled probe a previous run kept in the cache (ranker, files, figures again)")
    args = parser.parse_args(argv)
    variant = Variant(args.teacher, args.probe, args.centred, args.seed, args.text)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    proxy_bench._modules()
    from probe_select.probes.atomic import atomic_write_text
    command = "bench/distilled_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    figures = args.out / f"{NAME}.json"
    earlier = json.loads(figures.read_text()) if figures.exists() else {}
    results = dict(earlier)             # the families not measured now keep their figures
    saved_run = args.out / "proxy_bench.json"
    def write_figures(header: str) -> None:
        atomic_write_text(args.out / f"{NAME}.json", json.dumps(results, indent=2, default=float) + "\n")
        atomic_write_text(args.out / f"{NAME}.md", markdown(results, header))

    for family in args.families:        # each family's figures written as soon as measured: they took the time
        if args.confirm_only:
            results[family]["confirmation"] = confirm_family(family, args.cache,
                                                             text=Variant.of(results[family]["training"]).text)
        elif args.aside:
            if family not in results:
                parser.error(f"--aside records a variant beside a saved run of {family}: run it without --aside first")
            result = measure(family, args.cache, args.epochs, args.reuse_distilled, not args.no_early_rows,
                             variant, aside=True)
            # another run may have recorded its variant while this one trained: read the figures again
            results = json.loads(figures.read_text())
            results[family]["by_sets"] = by_sets(results[family], result)
            results[family]["by_sets"][set_key(result["training"])]["command"] = command.strip()
            write_figures(header_command(args.out / f"{NAME}.md", command.strip()))
            continue
        else:
            results[family] = measure(family, args.cache, args.epochs, args.reuse_distilled, not args.no_early_rows,
                                      variant)
            results[family]["by_sets"] = by_sets(earlier.get(family), results[family])
        write_figures(command.strip())
        if saved_run.exists():
            saved = json.loads(saved_run.read_text())
            saved["families"][family][NAME] = report_entry(results[family])
            atomic_write_text(saved_run, json.dumps(saved, indent=2, default=float) + "\n")
            proxy_bench.rewrite_report_from(args.out)
    return results


if __name__ == "__main__":
    main()
