"""The one exception type users see: the CLI prints its message, never a traceback."""


class DistqError(Exception):
    """A bad input (config value, data file, reward function, checkpoint) or a failed run, named in the message."""
