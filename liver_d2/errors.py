"""One exception type for a user's bad input, so tools can print one line instead of a stack."""


class LiverD2Error(Exception):
    """Bad input or configuration; the message names the file or key and the reason."""


class BadVolumeError(LiverD2Error):
    """A scan or label file that cannot be used (corrupt, mismatched, wrong labels ...)."""
