"""Exceptions the runtime raises, so callers can tell a bad artifact from a bad backend choice."""


class ArtifactError(Exception):
    """An artifact directory is missing, incomplete, corrupted or of an unsupported format."""


class BackendError(Exception):
    """A backend is unknown, unusable on this machine, or cannot run the given artifact."""
