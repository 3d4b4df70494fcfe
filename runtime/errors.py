"""Exceptions the runtime raises, so callers can tell a bad artifact from a bad backend choice."""


class ArtifactError(Exception):
    """An artifact directory is missing, incomplete, corrupted or of an unsupported format."""


class BackendError(Exception):
    """A backend is unknown, unusable on this machine, or cannot run the given artifact."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The error's first line, cut to `limit` characters: for one-line reports of a failure."""
    return (str(err).strip().splitlines() or [""])[0][:limit]
