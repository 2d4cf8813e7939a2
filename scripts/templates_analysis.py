"""The analysis workflows (attention maps, latent PCA, image metrics, schedules...), registered with
`@workflow` like scripts/templates_selection.py and written by scripts/build_workflows.py."""
from __future__ import annotations

from workflow_graph import Node, Note, Workflow, workflow  # noqa: F401  (the declarations' vocabulary)
