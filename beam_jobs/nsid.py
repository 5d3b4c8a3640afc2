"""Check Flickr user NSIDs given on a command line, with a hint for the usual slips.

A Flickr NSID is digits, '@N' and two digits (`12345678@N00`): it is on every YFCC line and in
the dataset's metadata. People often paste only the number, or lower-case the 'N'; searching or
taking down such a value would silently match nothing, so the jobs refuse it with a hint.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from beam_jobs.common import UsageError

NSID_PATTERN = re.compile(r"[0-9]+@N[0-9]{2}")


def nsid_hint(value: str) -> Optional[str]:
    """None for a well-formed NSID, else a one-line explanation with a likely correction."""
    if NSID_PATTERN.fullmatch(value):
        return None
    number, at, suffix = value.strip().partition("@")
    if number.isdigit() and not at:
        guess = f"did you mean {number}@N01? (the @N.. suffix is part of the NSID: copy it " \
                "from the YFCC line or the dataset's metadata)"
    elif number.isdigit() and re.fullmatch(r"[Nn]?[0-9]{1,2}", suffix):
        guess = f"did you mean {number}@N{suffix.lstrip('Nn').zfill(2)}?"
    else:
        guess = "a Flickr NSID looks like 12345678@N00"
    return f"--user_nsid {value!r} is not a Flickr NSID: {guess}"


def check_nsids(values: Iterable[str]) -> list[str]:
    """The values, when every one is a well-formed NSID; else UsageError with the hint."""
    values = list(values)
    for value in values:
        hint = nsid_hint(value)
        if hint:
            raise UsageError(hint)
    return values
