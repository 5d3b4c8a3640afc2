"""Flickr's clean form of a tag, so that every spelling of an opt-out tag such as `no_cv` matches.

Flickr stores each tag twice: the raw form the owner typed (`No_CV`, `no cv`, `no-cv`) and a
clean form with white space and punctuation removed and letters lower-cased (`nocv`); the clean
form is the tag's identity (its URL, and what `flickr.people.getPublicPhotos` returns in
`extras=tags`). Matching on the clean form makes `no_cv`, `No_CV`, `no cv`, `nocv`, `no-cv`,
`NOCV` and `no.cv` one tag, while `nocv2` and `knocv` stay other tags.

YFCC100M writes tags URL-encoded with `+` for a space (`no+cv`); `transforms.yfcc_format`
decodes them when a line is parsed, so `YfccRecord.user_tags` holds raw tags (`no cv`) and
`clean_tag` never sees the encoded form. Removed characters are Unicode white space,
punctuation (P*), symbols (S*), separators (Z*) and control characters (C*): ASCII tags take a
`str.translate` fast path, and clean forms are cached (scan reads every tag of 100M lines).
"""
from __future__ import annotations

import functools
import string
import unicodedata
from typing import AbstractSet, Iterable, Optional

_REMOVED_CATEGORIES = frozenset("PSZC")
_ASCII_REMOVED = str.maketrans("", "", string.punctuation + string.whitespace
                               + "".join(map(chr, range(32))) + "\x7f")


def _kept(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char)[0] not in _REMOVED_CATEGORIES


@functools.lru_cache(maxsize=1 << 16)
def clean_tag(raw: str) -> str:
    """Flickr's clean form of a raw tag: white space and punctuation removed, lower case.

    Cached: tags repeat a lot across YFCC lines, and a cache hit is cheaper than the clean-up."""
    if raw.isascii():
        return raw.translate(_ASCII_REMOVED).lower()
    return "".join(filter(_kept, raw)).lower()


def find_tag(tags: Iterable[str], clean_names: AbstractSet[str]) -> Optional[str]:
    """The first of `tags` (raw) whose clean form is one of `clean_names` (clean), else None."""
    if clean_names:
        for tag in tags:
            if clean_tag(tag) in clean_names:
                return tag
    return None


def has_tag(tags: Iterable[str], clean_name: str) -> bool:
    """True when one of `tags` (raw or clean) is the tag `clean_name` in Flickr's clean form."""
    return find_tag(tags, {clean_tag(clean_name)}) is not None
