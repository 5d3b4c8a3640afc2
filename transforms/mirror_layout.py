"""Where the Multimedia Commons mirror layout stores a photo: data/images/{h[:3]}/{h[3:6]}/{h}.EXT.

`h` is YFCC's hash column: md5 of the download URL, each byte printed as '%x' without zero
padding, so 16 to 32 lowercase hex characters (design section 1). Anything else (upper case,
'../', '/', a URL) is refused here, so that no mirror path can leave its prefix.
"""
from __future__ import annotations

import os
import re

MIRROR_IMAGE_DIR = "data/images"
# File extensions under which the mirror stores a photo, most common first.
MIRROR_EXTENSIONS = ("jpg", "png", "gif")
_HASH_RE = re.compile(r"[0-9a-f]{16,32}")


class BadMirrorHash(ValueError):
    """A hash that is not YFCC's 16-32 lowercase hex characters."""


def is_mirror_hash(photo_hash: str) -> bool:
    """True for a well-formed YFCC hash (16-32 lowercase hex characters, nothing else)."""
    return isinstance(photo_hash, str) and _HASH_RE.fullmatch(photo_hash) is not None


def mirror_relative_path(photo_hash: str, extension: str = "jpg") -> str:
    """'data/images/{h[:3]}/{h[3:6]}/{h}.{extension}'; raises BadMirrorHash for a bad hash."""
    if not is_mirror_hash(photo_hash):
        raise BadMirrorHash(f"mirror hash {str(photo_hash)[:80]!r} is not 16-32 lowercase hex")
    if extension not in MIRROR_EXTENSIONS:
        raise ValueError(f"mirror extension {extension!r} not one of {MIRROR_EXTENSIONS}")
    return f"{MIRROR_IMAGE_DIR}/{photo_hash[:3]}/{photo_hash[3:6]}/{photo_hash}.{extension}"


def mirror_path(prefix: str, photo_hash: str, extension: str = "jpg") -> str:
    """The photo's path under `prefix`: '/'-joined for URLs (gs://, http://), os.path.join for
    local directories. Raises BadMirrorHash for a bad hash."""
    relative = mirror_relative_path(photo_hash, extension)
    if "://" in prefix:
        return f"{prefix.rstrip('/')}/{relative}"
    return os.path.join(prefix, *relative.split("/"))
