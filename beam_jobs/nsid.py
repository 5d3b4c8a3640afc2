"""Check Flickr user NSIDs given on a command line, with a hint for the usual slips.

A Flickr NSID is digits, '@N' and two digits (`12345678@N00`): it is on every YFCC line and in
the dataset's metadata. People often paste only the number, or lower-case the 'N'; searching or
taking down such a value would silently match nothing, so the jobs refuse those slips with a
hint. Anything else is taken as given: YFCC's NSID column can hold any text (issue 10, finding
3), and a takedown must be able to name it.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from beam_jobs.common import UsageError

NSID_PATTERN = re.compile(r"[0-9]+@N[0-9]{2}")


def nsid_hint(value: str) -> Optional[str]:
    """A one-line explanation with the likely correction for a recognisable slip (only the
    number, or a mangled @N.. suffix), else None (a well-formed NSID, or any other text)."""
    if NSID_PATTERN.fullmatch(value):
        return None
    number, at, suffix = value.strip().partition("@")
    if number.isdigit() and not at:
        guess = f"did you mean {number}@N01? (the @N.. suffix is part of the NSID: copy it " \
                "from the YFCC line or the dataset's metadata)"
    elif number.isdigit() and re.fullmatch(r"[Nn]?[0-9]{1,2}", suffix):
        guess = f"did you mean {number}@N{suffix.lstrip('Nn').zfill(2)}?"
    else:
        return None
    return f"--user_nsid {value!r} is not a Flickr NSID: {guess}"


def check_nsids(values: Iterable[str]) -> list[str]:
    """The values, when every one is a well-formed NSID; else UsageError with the hint."""
    values = list(values)
    for value in values:
        hint = nsid_hint(value)
        if hint:
            raise UsageError(hint)
    return values
