"""The opt-out list: Flickr users and photos that must never appear in any output.

Format (a text file, local or any Beam filesystem such as gs://): one entry per line,
`#` starts a comment. `user:NSID` or a bare NSID (contains '@') opts out a user; `photo:ID`
or a bare integer opts out one photo. `takedown` appends to `DATASET/opt_out.txt`, and
`rebuild --opt_out=PATH[,PATH]` reads any number of such files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

OPT_OUT_FILENAME = "opt_out.txt"


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
    """Parse an opt-out list; raises ValueError naming the line for an entry it cannot read."""
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
        if kind == "photo" or (not kind and entry.isdigit()):
            if not entry.isdigit():
                raise ValueError(f"{origin}:{number}: photo id is not an integer: {raw!r}")
            photos.add(int(entry))
        elif kind == "user" or "@" in entry:
            if any(ch.isspace() for ch in entry):
                raise ValueError(f"{origin}:{number}: user NSID contains white space: {raw!r}")
            users.add(entry)
        else:
            raise ValueError(
                f"{origin}:{number}: not a user NSID (needs '@') or photo id: {raw!r}")
    return OptOut(frozenset(users), frozenset(photos))


def format_opt_out(user_nsids: Iterable[str] = (), photo_ids: Iterable[int] = ()) -> str:
    """Lines to append to an opt-out file, sorted so that the file is deterministic."""
    lines = [f"user:{nsid}" for nsid in sorted(set(user_nsids))]
    lines += [f"photo:{int(pid)}" for pid in sorted(set(photo_ids))]
    return "".join(line + "\n" for line in lines)


def read_opt_out(paths: Iterable[str]) -> OptOut:
    """Read and merge opt-out files through Beam's FileSystems (so gs:// works)."""
    from apache_beam.io.filesystems import FileSystems

    merged = OptOut()
    for path in paths:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
        merged = merged.merge(parse_opt_out(text, origin=path))
    return merged
