"""User-facing errors: one clear line, exit code 2, no traceback."""


class SparsetuneError(Exception):
    """A problem with the user's input (recipe, files, model) that the user can fix.

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    """

    exit_code = 2
