"""One exception type for a user's bad input, so tools can print one line instead of a stack."""
import sys


class LiverD2Error(Exception):
    """Bad input or configuration; the message names the file or key and the reason."""


class BadVolumeError(LiverD2Error):
    """A scan or label file that cannot be used (corrupt, mismatched, wrong labels ...)."""


def report_skipped(failures: list[str], what: str) -> int:
    """Print a batch job's skipped items (one line each) to stderr; the tool's exit code:
    1 when something was skipped, else 0."""
    if not failures:
        return 0
    print(f"\n{len(failures)} {what}(s) skipped:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1
