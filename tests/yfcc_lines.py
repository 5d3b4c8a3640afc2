"""Write real YFCC metadata files for tests and benches: plain, .gz or .bz2, chosen by suffix."""
from __future__ import annotations

import bz2
import gzip
import random
from pathlib import Path
from typing import Iterable, Iterator, Union

from tests.factories import make_record
from transforms.records import LICENSES, YfccRecord
from transforms.yfcc_format import format_line, photo_hash

Line = Union[str, bytes]


def write_lines(path: Union[str, Path], lines: Iterable[Line], final_newline: bool = True) -> str:
    """Write lines ('\\n'-joined; bytes written as is) to `path`, compressed by its suffix."""
    encoded = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    data = b"\n".join(encoded) + (b"\n" if final_newline and encoded else b"")
    path = str(path)
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".bz2"):
        data = bz2.compress(data)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def record_line(photo_id: int, columns: int = 23, **overrides) -> str:
    """One valid YFCC line for `make_record(photo_id, **overrides)`."""
    return format_line(make_record(photo_id, **overrides), columns)


_WORDS = ("people portrait street festival beach summer family wedding party concert city "
          "night travel london paris new+york 2008 canon nikon friends kids dog park snow "
          "café über 日本 москва señor <b>bold</b> <a href=\"http://x.org/?a=1&b=2\">link</a> "
          "100% \"quoted\" it's a/b").split()
_LICENSE_NAMES = tuple(LICENSES)


def _phrase(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def random_records(count: int, seed: int = 0, start_id: int = 1) -> Iterator[YfccRecord]:
    """Plausible YFCC records: most descriptions empty, some long (up to a few thousand chars),
    tags on about half, geotags on a third, licences spread like YFCC's, 1% videos."""
    rng = random.Random(seed)
    # Pools of texts keep generation fast (the parser sees the same bytes either way).
    short_texts = [_phrase(rng, rng.randint(1, 30)) for _ in range(2000)]
    long_texts = [_phrase(rng, rng.randint(100, 600)) for _ in range(200)]
    for offset in range(count):
        photo_id = start_id + offset
        server, secret = rng.randint(1, 9999), "%010x" % rng.getrandbits(40)
        url = f"http://farm{rng.randint(1, 9)}.staticflickr.com/{server}/{photo_id}_{secret}.jpg"
        has_geo = rng.random() < 0.33
        roll = rng.random()
        license_name = rng.choices(_LICENSE_NAMES, weights=(17, 9, 5, 13, 29, 26))[0]
        description = ("" if roll < 0.55 else rng.choice(short_texts) if roll < 0.95
                       else rng.choice(long_texts))
        yield make_record(
            photo_id,
            download_url=url,
            photo_hash=photo_hash(url),
            user_nsid=f"{rng.randint(10**7, 10**8)}@N0{rng.randint(0, 8)}",
            user_nickname=_phrase(rng, 1),
            date_taken=None if rng.random() < 0.05 else
            f"20{rng.randint(0, 14):02d}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} 12:3{rng.randint(0, 9)}:00.0",
            date_uploaded=rng.randint(10**9, 14 * 10**8),
            capture_device=rng.choice(("", "Canon+EOS+5D", "NIKON D70", "Apple iPhone 4")),
            title=_phrase(rng, rng.randint(0, 5)),
            description=description,
            user_tags=tuple(_phrase(rng, 1) for _ in range(rng.choice((0, 0, 3, 8, 15)))),
            machine_tags=tuple(f"geo:lat={rng.random():.4f}" for _ in range(rng.choice((0, 0, 0, 1)))),
            longitude=round(rng.uniform(-180, 180), 6) if has_geo else None,
            latitude=round(rng.uniform(-90, 90), 6) if has_geo else None,
            accuracy=rng.randint(1, 16) if has_geo else None,
            page_url=f"http://www.flickr.com/photos/someone/{photo_id}/",
            license_name=license_name,
            license_url=LICENSES[license_name][1],
            license=LICENSES[license_name][0],
            server_id=str(server),
            secret=secret,
            marker=1 if rng.random() < 0.01 else 0,
            line_idx=photo_id - 1,
        )
