"""The one way into podman's user namespace, for code that reads a mounted image.

A rootless ``podman image mount`` exists only inside podman's user
namespace, so whatever reads the mounted tree must run there too.  Any
function marked ``@entry`` can be called through ``call``: as root it simply
runs here; rootless it runs as ``python -m bcvk.image.inns MODULE FUNCTION
ARGS…`` under ``podman unshare``, which prints its JSON result.  Arguments
are strings (paths, names) and results JSON either way, so both paths
behave the same; callers turn the JSON back into their typed objects.

A ``BcvkError`` raised in the namespace comes back as the same one-line
error and hint, not as a failed command.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from bcvk import run
from bcvk.errors import BcvkError, CommandError
from bcvk.host import podman

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__bcvk_inns_entry__"
# Exit status of the namespace helper when it reports a BcvkError as JSON.
_ERROR_STATUS = 3


def entry(fn: F) -> F:
    """Allow FN to be called through ``call`` (and so, by name, from argv)."""
    setattr(fn, _MARK, True)
    return fn


def call(fn: Callable[..., Any], *args: str | os.PathLike[str]) -> Any:
    """FN(*ARGS) where the image mount is visible; the result as JSON data."""
    if not getattr(fn, _MARK, False):
        raise TypeError(f"{fn.__qualname__} is not an inns entry point")
    words = [os.fspath(a) for a in args]
    if not podman.rootless():
        return json.loads(json.dumps(fn(*words)))
    # -P: the current directory is not on the path, so a checkout the user
    # stands in (another bcvk, another layout) is never what runs.
    argv = [sys.executable, "-P", "-m", "bcvk.image.inns", fn.__module__, fn.__qualname__, *words]
    try:
        return json.loads(run.output(podman.unshare_argv(argv)))
    except CommandError as exc:
        if exc.returncode == _ERROR_STATUS:
            try:
                error = json.loads(exc.stderr_tail.splitlines()[-1])
            except (ValueError, IndexError):
                raise exc from None
            raise BcvkError(str(error.get("message")), error.get("hint")) from None
        raise


def _resolve(module: str, name: str) -> Callable[..., Any]:
    if not module.startswith("bcvk."):
        raise SystemExit(f"not a bcvk module: {module}")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None or not getattr(fn, _MARK, False):
        raise SystemExit(f"{module}.{name} is not an inns entry point")
    return fn  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    fn = _resolve(argv[0], argv[1])
    try:
        result = fn(*argv[2:])
    except BcvkError as exc:
        print(json.dumps({"message": exc.message, "hint": exc.hint}), file=sys.stderr)
        return _ERROR_STATUS
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
