"""The error raised for weights or sources that cannot be converted."""


class ConversionError(ValueError):
    """A source that cannot be read or converted; the message names the problem and the fix."""
