"""The one base class for bad input.

A :class:`BakeryError` means that the user asked for something that cannot be done (a missing
file, a vector extracted from another model, an output that would be overwritten, a Hub that
refuses the token); its message says what to do instead. The command line prints it as one line,
``error: ...``, and exits with code 2. Any other exception that escapes a command is a bug in
bakery: the command line prints it with its traceback and exits with code 1
(:func:`bakery.cli.common.clear_errors`).

Every error class of the package that means bad input derives from it. It is a ``ValueError``
so that code catching ``ValueError`` around the library keeps working; a class that also means a
missing or existing file derives from ``FileNotFoundError`` or ``FileExistsError`` as well.
"""

from __future__ import annotations


class BakeryError(ValueError):
    """The user asked for something that cannot be done; the message says what to do."""
