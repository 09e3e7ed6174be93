"""Options and error handling shared by every command."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Callable

import click

from bakery.errors import BakeryError
from bakery.models import DEFAULT_MODEL

# OS errors that are about the user's paths or machine, not a bug: one line, like a BakeryError
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model", "-m", default=lambda: os.environ.get("BAKERY_MODEL", DEFAULT_MODEL),
        show_default=DEFAULT_MODEL,
        help="A local folder, a Hub id already in the local cache, or a built-in alias.",
    )(f)


def trust_option(f: Callable) -> Callable:
    return click.option("--trust-remote-code", is_flag=True, default=False,
                        help="Run code shipped with the model (off unless you ask).")(f)


def is_bad_input(e: BaseException) -> bool:
    """A BakeryError, or an OS error about the user's paths or disk: not a bug in bakery."""
    if isinstance(e, BakeryError) or isinstance(e, USER_OS_ERRORS):
        return True
    return isinstance(e, OSError) and e.errno in USER_ERRNOS


def error_line(e: BaseException) -> str:
    """The one line shown for bad input: the message, or for an OS error its text and path."""
    if isinstance(e, OSError) and not isinstance(e, BakeryError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e)


def clear_errors(f: Callable) -> Callable:
    """Report what escapes a command truthfully.

    Bad input (:class:`bakery.errors.BakeryError`, or a missing/existing/forbidden path, or a full
    disk) becomes one line ``error: ...`` on stderr and exit code 2, like click's own usage errors.
    Anything else is a bug in bakery: it is reported as an internal error with the full traceback
    and exit code 1. ``BAKERY_DEBUG=1`` re-raises everything (for a debugger).
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if os.environ.get("BAKERY_DEBUG"):
                raise
            if is_bad_input(e):
                click.secho(f"error: {error_line(e)}", fg="red", err=True)
                sys.exit(2)
            click.secho("internal error (a bug in bakery, please report it):", fg="red", err=True)
            click.echo(traceback.format_exc().rstrip(), err=True)
            sys.exit(1)

    return wrapper


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is None:
        return
    if value < 1:
        raise click.BadParameter("must be at least 1", ctx=ctx, param=param)
    import torch

    torch.set_num_threads(value)


def threads_option(f: Callable) -> Callable:
    """``--threads N``: torch CPU threads. On a busy machine 1 thread is often many times faster,
    because torch's threads otherwise contend with other processes for the cores."""
    return click.option("--threads", type=int, default=None, expose_value=False, callback=_set_threads,
                        help="torch CPU threads (default: torch's choice; 1 is far faster on a busy machine).")(f)


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)
