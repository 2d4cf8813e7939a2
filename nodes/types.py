"""Custom socket types of the pack (shown as colored links in the graph)."""
from comfy_api.latest import io

Activations = io.Custom("PS_ACTIVATIONS")   # probes.features.ActivationSet (or None: model had no tap)
Probe = io.Custom("PS_PROBE")               # nodes.selection.LoadedProbe
Scores = io.Custom("PS_SCORES")             # probes.scoring.CandidateScores

CATEGORY = "sampling/probe_select"
EvaluatorModel = io.Custom("PS_EVALUATOR")      # probes.evaluators.ImageEvaluator (a loaded model)
ImageScoresType = io.Custom("PS_IMAGE_SCORES")  # probes.evaluators.ImageScores
