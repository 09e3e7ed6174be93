"""Options and error handling shared by every command."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import click

from bakery.models import DEFAULT_MODEL


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model", "-m", default=lambda: os.environ.get("BAKERY_MODEL", DEFAULT_MODEL),
        show_default=DEFAULT_MODEL,
        help="A local folder, a Hub id already in the local cache, or a built-in alias.",
    )(f)


def trust_option(f: Callable) -> Callable:
    return click.option("--trust-remote-code", is_flag=True, default=False,
                        help="Run code shipped with the model (off unless you ask).")(f)


def clear_errors(f: Callable) -> Callable:
    """Turn library errors (bad input) into one readable line and exit code 2, no traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as e:
            if os.environ.get("BAKERY_DEBUG"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

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
