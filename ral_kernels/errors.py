"""Errors shared by the API and the backends (a module of its own, so that no backend
imports the API)."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""
