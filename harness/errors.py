"""The base class of the harness's errors about what a user handed it: a library, a C
source, a port, a model, a file, a configuration, a command-line value.

The CLI reports these in one line with exit status 2, together with the references'
own input errors (:class:`pyref.formats.FormatError`, :class:`pyref.config.ConfigError`:
pyref does not depend on the harness, so they are not subclasses of :class:`InputError`)
and the OS's file errors; anything else is a bug of the harness and gets the trace and
exit status 3, so that a bug of ours is never blamed on the user. Standard library only:
the build module, which runs before any virtual environment exists, raises these too.
"""


class InputError(Exception):
    """Something the user gave is wrong; the message says what and, where it can, how to fix it."""


class ModelError(InputError, ValueError):
    """A torch model cannot be checked as given (loading, mapping, optimizer): says what and why."""
