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


def force_option(what: str) -> Callable[[Callable], Callable]:
    """``--force``: replace ``what`` (a previous output of the same command) and nothing else."""
    return click.option("--force", is_flag=True, help=f"Replace {what} (never anything else).")


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


_PLACEMENT = "bakery.placement"


def _placement_setter(field: str, parse: Callable, auto_dtype: str | None = None) -> Callable:
    """A click callback that checks one placement option and keeps it for the command: the
    placement is applied only while the command runs (:func:`device_options`), so a parse error
    in any option leaves the process-wide default untouched."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        from bakery.placement import DeviceError

        try:
            parsed = parse(value)
        except DeviceError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        if field == "dtype" and auto_dtype and str(value).lower() == "auto":
            parsed = auto_dtype
        ctx.meta.setdefault(_PLACEMENT, {})[field] = parsed

    return callback


def _check_device(value: str) -> str:
    from bakery.placement import resolve_device

    resolve_device(value)  # refuses a device this machine does not have, before any work
    return value


def _check_dtype(value: str) -> str:
    from bakery.placement import resolve_dtype

    resolve_dtype(value, "cpu")
    return value


def _device_map(value):
    from bakery.placement import parse_device_map

    return parse_device_map(value)


def _max_memory(value):
    from bakery.placement import parse_max_memory

    return parse_max_memory(value)


def device_options(f: Callable | None = None, *, auto_dtype: str | None = None,
                   dtype_help: str = "bfloat16 on an accelerator, float32 on the CPU") -> Callable:
    """``--device``, ``--dtype``, ``--device-map``, ``--max-memory``, ``--offload-folder``: where
    every model this command loads runs (see docs/devices.md). ``auto_dtype`` fixes what
    ``--dtype auto`` means for a command whose work needs one precision (bake: float32)."""

    def deco(fn: Callable) -> Callable:
        opts = [
            click.option("--device", default="auto", show_default=True, expose_value=False,
                         callback=_placement_setter("device", _check_device),
                         help="Where models run: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."),
            click.option("--dtype", default="auto", show_default=True, expose_value=False,
                         type=click.Choice(["auto", "float32", "bfloat16", "float16"], case_sensitive=False),
                         callback=_placement_setter("dtype", _check_dtype, auto_dtype),
                         help=f"Model dtype; auto: {dtype_help}."),
            click.option("--device-map", default=None, expose_value=False,
                         callback=_placement_setter("device_map", _device_map),
                         help="Spread a model too big for one device with accelerate: auto, balanced, "
                              "sequential, or a JSON {module: device|\"disk\"} object or file."),
            click.option("--max-memory", default=None, expose_value=False,
                         callback=_placement_setter("max_memory", _max_memory),
                         help="With --device-map: per-device budget, e.g. 0=20GiB,1=40GiB,cpu=64GiB."),
            click.option("--offload-folder", default=None, type=click.Path(file_okay=False),
                         expose_value=False, callback=_placement_setter("offload_folder", lambda v: v),
                         help="With --device-map: folder for weights offloaded to \"disk\"."),
        ]
        @functools.wraps(fn)
        def run(*args, **kwargs):
            from bakery.placement import using_placement

            with using_placement(**click.get_current_context().meta.get(_PLACEMENT, {})):
                return fn(*args, **kwargs)

        for opt in reversed(opts):
            run = opt(run)
        return run

    return deco(f) if f is not None else deco
