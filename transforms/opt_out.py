"""The opt-out list: Flickr users and photos that must never appear in any output.

Format (a text file, local or any Beam filesystem such as gs://): one entry per line,
`#` starts a comment. `user:NSID` or a bare NSID (contains '@') opts out a user; `photo:ID`
or a bare integer (ASCII digits) opts out one photo. `takedown` appends to `DATASET/opt_out.txt`,
and `rebuild --opt_out=PATH[,PATH]` reads any number of such files.

NSIDs are percent-encoded (UTF-8) wherever they hold anything but ASCII letters, digits, '@',
'-', '.', '_' or '~': YFCC's NSID column is itself %-decoded, so an NSID may hold '#', white
space, '%', ':' or any unicode, and every one must round-trip (issue 10, finding 3). A real NSID
such as `12345678@N00` is written as it is, so existing files read the same; a literal '%'
followed by two hex digits in a hand-written entry is read as an escape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import quote, unquote

OPT_OUT_FILENAME = "opt_out.txt"
_PHOTO_ID = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class OptOut:
    """Opted-out user NSIDs and photo ids."""

    user_nsids: frozenset[str] = field(default_factory=frozenset)
    photo_ids: frozenset[int] = field(default_factory=frozenset)

    def excludes(self, user_nsid: str | None, photo_id: int | None) -> str | None:
        """Return why (user_opt_out / photo_opt_out) the photo is excluded, or None."""
        if user_nsid is not None and user_nsid in self.user_nsids:
            return "user_opt_out"
        if photo_id is not None and photo_id in self.photo_ids:
            return "photo_opt_out"
        return None

    def merge(self, other: "OptOut") -> "OptOut":
        return OptOut(self.user_nsids | other.user_nsids, self.photo_ids | other.photo_ids)

    def __bool__(self) -> bool:
        return bool(self.user_nsids or self.photo_ids)


def parse_opt_out(text: str, origin: str = "<opt-out>") -> OptOut:
    """Parse an opt-out list; raises ValueError naming the line for an entry it cannot read.

    Nothing is returned unless every line is good, so a caller that parses before writing (takedown)
    never half-applies a list. `validate_opt_out` is the same check by name.
    """
    users: set[str] = set()
    photos: set[int] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        kind, _, value = entry.partition(":")
        if value and kind in ("user", "photo"):
            entry = value.strip()
        else:
            kind = ""
        if kind == "photo" or (not kind and _PHOTO_ID.fullmatch(entry)):
            if not _PHOTO_ID.fullmatch(entry):
                raise ValueError(f"{origin}:{number}: photo id is not an integer: {raw!r}")
            photos.add(int(entry))
        elif kind == "user" or "@" in entry:
            if any(ch.isspace() for ch in entry):
                raise ValueError(f"{origin}:{number}: user NSID contains white space (write it "
                                 f"percent-encoded, e.g. %20): {raw!r}")
            users.add(_decode_nsid(entry, f"{origin}:{number}", raw))
        else:
            raise ValueError(
                f"{origin}:{number}: not a user NSID (needs '@') or photo id: {raw!r}")
    return OptOut(frozenset(users), frozenset(photos))


def validate_opt_out(text: str, origin: str = "<opt-out>") -> OptOut:
    """Check a whole opt-out list before acting on any of it; raises ValueError naming the line."""
    return parse_opt_out(text, origin)


def _decode_nsid(entry: str, where: str, raw: str) -> str:
    try:
        return unquote(entry, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: user NSID escapes are not UTF-8: {raw!r}") from None


def encode_nsid(nsid: str) -> str:
    """The NSID as written in an opt-out file (ASCII, no '#', white space or '%' left raw)."""
    if not nsid:
        raise ValueError("an empty user NSID cannot be opted out")
    return quote(nsid, safe="@", errors="strict")


def format_opt_out(user_nsids: Iterable[str] = (), photo_ids: Iterable[int] = ()) -> str:
    """Lines to append to an opt-out file, sorted so that the file is deterministic.

    Raises ValueError (before anything is written) for an entry that would not read back the same.
    """
    users, photos = set(user_nsids), {int(pid) for pid in photo_ids}
    negative = sorted(pid for pid in photos if pid < 0)
    if negative:
        raise ValueError(f"photo ids are not negative: {negative[:5]}")
    lines = [f"user:{encode_nsid(nsid)}" for nsid in sorted(users)]
    lines += [f"photo:{pid}" for pid in sorted(photos)]
    text = "".join(line + "\n" for line in lines)
    if parse_opt_out(text) != OptOut(frozenset(users), frozenset(photos)):
        raise ValueError("opt-out entries do not round-trip")  # a bug here, never silent
    return text


def read_opt_out(paths: Iterable[str]) -> OptOut:
    """Read and merge opt-out files through Beam's FileSystems (so gs:// works)."""
    from apache_beam.io.filesystems import FileSystems

    merged = OptOut()
    for path in paths:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
        merged = merged.merge(parse_opt_out(text, origin=path))
    return merged
