"""User-facing errors.

Every problem caused by input (a bad file, spec, plan, target, ...) is raised as a
:class:`CwhawqError`; the CLI prints its message on one line and exits with code 2.
"""


class CwhawqError(Exception):
    """An error caused by user input; the CLI reports it in one line with exit code 2."""

    exit_code = 2


class DataError(CwhawqError):
    pass


class ModelError(CwhawqError):
    pass


class PlanError(CwhawqError):
    pass


class ExportError(CwhawqError):
    pass


class CompileError(CwhawqError):
    pass
