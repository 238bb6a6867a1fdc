"""Paths a client names, checked against the directories a server allows (no path traversal).

Shared by the evaluator (datasets) and the web gateway (dataset images), which must not import each
other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound


def resolve_allowed(path: str | os.PathLike[str], allowed_roots: Sequence[str | os.PathLike[str]],
                    what: str = "dataset path") -> Path:
    """Resolves ``path`` (symlinks included) and checks that it lies inside one of ``allowed_roots``.

    Args:
        path: the path to check.
        allowed_roots: the directories it may lie in.
        what: how error messages name the path ("dataset path", "image").

    Raises:
        InvalidArgument: no allowed roots, a path the file system cannot hold (a NUL byte, a name
            too long), or one that resolves outside all of them.
        NotFound: the path does not exist.
    """
    if not allowed_roots:
        raise InvalidArgument("no allowed dataset roots are configured")
    if "\0" in os.fspath(path):
        raise InvalidArgument(f"{what} contains a NUL byte")
    candidate = Path(path)
    try:
        resolved = candidate.resolve()
        # Outside the roots is refused before existence is checked: no probing of other paths.
        if not any(resolved.is_relative_to(Path(root).resolve()) for root in allowed_roots):
            raise InvalidArgument(f"{what} {str(candidate)!r} is outside the allowed roots "
                                  f"({', '.join(str(r) for r in allowed_roots)})")
        exists = resolved.exists()
    except OSError as exc:  # ENAMETOOLONG, ELOOP...: the file system cannot hold such a path
        raise InvalidArgument(f"{what} {str(candidate)!r} is not a usable path: {exc.strerror}") from None
    if not exists:
        raise NotFound(f"{what} {str(candidate)!r} does not exist")
    return resolved
