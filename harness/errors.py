"""The one base class of every error about what a user handed the harness: a library, a C
source, a port, a file, a configuration, a command-line value. The CLI reports these in one
line with exit status 2; anything else is a bug of the harness and gets the trace and exit
status 3, so that a bug of ours is never blamed on the user. Standard library only: the
build module, which runs before any virtual environment exists, raises these too.
"""


class InputError(Exception):
    """Something the user gave is wrong; the message says what and, where it can, how to fix it."""
