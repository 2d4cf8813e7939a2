"""Errors that reach the ComfyUI user: name the node, say what is wrong and how to fix it."""


class ProbeSelectError(ValueError):
    """Bad input to a Probe-Select node. The message is shown as is in the ComfyUI error dialog."""

    def __init__(self, node_id: str, problem: str, fix: str = ""):
        self.node_id = node_id
        self.problem = problem
        self.fix = fix
        message = f"[{node_id}] {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
