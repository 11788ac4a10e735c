"""One "did you mean" for every registry and config key: a name nobody registered gets one line naming it, the
closest known name, and the choices."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """``; did you mean 'x'?`` for the known name closest to ``name`` (``prefix`` in front), or ``""``."""
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {prefix + hint[0]!r}?" if hint else ""


def unknown_name(what: str, name: str, known: Iterable[str], where: str = "") -> str:
    """``unknown method 'dg'; did you mean 'dgl'? choose from dgl, e2e, ...`` (``where``: e.g. `` in 'dgl+mann'``)."""
    known = sorted(known)
    return f"unknown {what} {name!r}{where}{did_you_mean(name, known)}; choose from {', '.join(known)}"


def package_version() -> str:
    """The installed distribution's version (``locallearn --version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("locallearn")
    except PackageNotFoundError:
        return "unknown (not installed)"
