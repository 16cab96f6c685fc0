"""Error types that stage entry points turn into a short message and a non-zero exit."""


class ImgclsError(Exception):
    """A user-facing error: the message says what went wrong, where, and how to fix it."""
