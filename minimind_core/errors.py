"""The reader's error type, apart so that the format maps (``bailing.py``) can raise it too."""


class CheckpointError(ValueError):
    """A file that is not a readable MiniMind checkpoint; the message says why and what to do."""
