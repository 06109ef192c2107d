"""User-facing errors. The CLI prints them as one line and exits with status 2."""


class MedrayError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class DataError(MedrayError):
    """Input data is unreadable or invalid; the message names the file, row/record and problem."""


class BundleError(MedrayError):
    """A model bundle is missing, incomplete, corrupt or incompatible."""
