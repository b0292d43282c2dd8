"""How a command fails: one line that names the cause and the file, a documented exit code, and
no traceback unless ``--debug``.

Exit codes (docs/troubleshooting.md, "Exit codes and messages"): 0 done; 1 an unexpected error
(a bug: rerun with --debug and report it) or, for align_faces.py --strict, images that failed;
2 bad input, a refused resume or a folder another run holds (the message says the fix); 3 the
machine refused (disk full, read-only or forbidden folder); 130 interrupted (Ctrl-C): rerun the
same command to resume.
"""
from __future__ import annotations

import errno
import sys
import traceback
from typing import Callable

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_MACHINE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class Refusal(Exception):
    """A refusal every command reports as bad input (exit 2), whatever its own error types: the
    message names the cause and the fix (e.g. an output folder another run holds)."""


_running = ""  # the script run_command is running: what a run lock says holds the folder


def running_command() -> str:
    return _running


def os_error_line(e: OSError) -> str:
    """One line for an OSError the machine raised, naming the file and what to do."""
    where = e.filename or "a file"
    if e.errno in _NO_SPACE:
        return f"disk full while writing {where}; free some space, then rerun the same command to resume"
    if e.errno in _NOT_WRITABLE:
        return (f"cannot write {where} ({e.strerror or 'not permitted'}); choose a writable output folder "
                "or fix its permissions, then rerun")
    return f"{where}: {e.strerror or e}"


def is_machine_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _NO_SPACE + _NOT_WRITABLE


def run_command(name: str, command: Callable[[], object], bad_input: tuple[type[BaseException], ...],
                debug: bool = False) -> int:
    """Run a script's one call and turn each way it can end into one line and an exit code
    (the call's own int is the exit code; anything else it returns means done)."""
    global _running
    _running = name
    try:
        rc = command()
        return rc if isinstance(rc, int) and not isinstance(rc, bool) else EXIT_OK
    except KeyboardInterrupt as e:  # a command that knows what an interrupt lost says so in the exception
        print(f"{name}: {str(e) or 'interrupted; rerun the same command to resume'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 — every failure ends in one line (the traceback with --debug)
        if debug:
            traceback.print_exc()
        if is_machine_error(e):
            print(f"{name}: error: {os_error_line(e)}", file=sys.stderr)
            return EXIT_MACHINE
        if isinstance(e, bad_input + (Refusal,)):
            print(f"{name}: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"{name}: unexpected error: {type(e).__name__}: {first}"
              + ("" if debug else " (rerun with --debug for the traceback, and please report it)"), file=sys.stderr)
        return EXIT_UNEXPECTED
