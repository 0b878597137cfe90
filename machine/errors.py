"""The two kinds of failure a user can see: bad input (exit 2) and a failed operation (exit 1)."""


class MachineError(Exception):
    """An operation failed; the message is one line meant for the user."""

    exit_code = 1


class UsageError(MachineError):
    """The command line or its values are wrong; nothing was changed."""

    exit_code = 2
