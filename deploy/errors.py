"""Every typed error of the launchers. Each CLI prints the message and exits non-zero; none
reaches a client. Imports nothing, so every deploy module (and a Ray actor) may import it."""

from __future__ import annotations


class InvalidSecrets(ValueError):
    """An API key or a secret file is unusable."""


class InvalidWorkerCounts(ValueError):
    """`--workers`, `--prefill-workers` and `--decode-workers` do not go together."""


class StartFailed(Exception):
    """`kvmesh serve`: a part exited or timed out before it was listening."""


class RayConfigError(ValueError):
    """A deploy setting is out of range; the CLI prints the message and exits 2."""


class RoleStartError(RuntimeError):
    """The role's child process exited before it was listening (raised inside its Ray actor)."""


class DeployError(RuntimeError):
    """The stack cannot be deployed as asked (already up, cluster too small, a role failed)."""
