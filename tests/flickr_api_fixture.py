"""A loopback fake of the Flickr REST API (`flickr.photos.getInfo`, `flickr.people.getPublicPhotos`,
`flickr.photos.licenses.getInfo`).

`FlickrApiFake` is a ThreadingHTTPServer on 127.0.0.1 that answers the three methods in JSON
(`format=json&nojsoncallback=1`) from a small world of `FakePhoto`s, the way Flickr does for an
unauthenticated key: a deleted or private photo is `stat: fail` code 1 in getInfo and absent from
its owner's public listing; an unknown user is code 1 in getPublicPhotos; listings are newest
first (highest id first), paged with `per_page` (at most 500). A wrong API key is code 100. The licence list is the
world's `licenses` (`FAKE_LICENSES`: Flickr's verified ids 0-10 plus test ids 11-13; None makes
licenses.getInfo fail with code 112, a lasting error).

Faults are queued with `inject(*answers)`: each request takes the next one instead of its real
answer ("429" with Retry-After: 1, "429-long" with Retry-After: 3600, "500", "503", "105" for
`stat: fail` code 105, "garbage" for a body that is not JSON; "ok" lets one request through).
`calls` counts the requests per method (faults included). Use the `flickr_api` pytest fixture,
whose world is `consent_world()`.
"""
from __future__ import annotations

import functools
import json
import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Optional
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.factories import make_record
from transforms.tags import clean_tag

API_PATH = "/services/rest/"
API_KEY = "test-key"
FAULTS = ("ok", "429", "429-long", "500", "503", "105", "garbage")


@dataclass
class FakePhoto:
    """A photo as Flickr holds it now."""

    photo_id: int
    owner: str
    license_id: int = 4  # Attribution License
    tags: tuple[str, ...] = ()  # raw forms
    public: bool = True
    deleted: bool = False


# The licence list the fake serves: ids 0-10 with the URLs of Flickr's recorded answer, then TEST
# data (not a claim about Flickr's real ids): two CC 4.0 licences that permit derivatives and one
# NoDerivs 4.0 licence. A photo may carry an id missing from this list (UNLISTED_LICENSE).
_CC = "https://creativecommons.org/"
FAKE_LICENSES: tuple[tuple[int, str, str], ...] = (
    (0, "All Rights Reserved", ""),
    (1, "Attribution-NonCommercial-ShareAlike License", f"{_CC}licenses/by-nc-sa/2.0/"),
    (2, "Attribution-NonCommercial License", f"{_CC}licenses/by-nc/2.0/"),
    (3, "Attribution-NonCommercial-NoDerivs License", f"{_CC}licenses/by-nc-nd/2.0/"),
    (4, "Attribution License", f"{_CC}licenses/by/2.0/"),
    (5, "Attribution-ShareAlike License", f"{_CC}licenses/by-sa/2.0/"),
    (6, "Attribution-NoDerivs License", f"{_CC}licenses/by-nd/2.0/"),
    (7, "No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    (8, "United States Government Work", "http://www.usa.gov/copyright.shtml"),
    (9, "Public Domain Dedication (CC0)", f"{_CC}publicdomain/zero/1.0/"),
    (10, "Public Domain Mark", f"{_CC}publicdomain/mark/1.0/"),
    (11, "CC BY 4.0", f"{_CC}licenses/by/4.0/"),
    (12, "CC BY-NC-SA 4.0", f"{_CC}licenses/by-nc-sa/4.0/"),
    (13, "CC BY-ND 4.0", f"{_CC}licenses/by-nd/4.0/"),
)
CC_BY_4, CC_BY_NC_SA_4, CC_BY_ND_4, UNLISTED_LICENSE = 11, 12, 13, 77


@dataclass
class World:
    """Flickr's current state: photos by id, and the licence list (None: the method fails)."""

    photos: dict[int, FakePhoto] = field(default_factory=dict)
    licenses: Optional[tuple[tuple[int, str, str], ...]] = FAKE_LICENSES

    def add(self, *photos: FakePhoto) -> "World":
        for photo in photos:
            self.photos[photo.photo_id] = photo
        return self

    def public_photos(self, owner: str) -> list[FakePhoto]:
        """The owner's public photos, newest (highest id) first."""
        return sorted((photo for photo in self.photos.values() if photo.owner == owner
                       and photo.public and not photo.deleted),
                      key=lambda photo: -photo.photo_id)

    def owners(self) -> set[str]:
        return {photo.owner for photo in self.photos.values()}


# The world of the consent tests: what happened to each photo since 2014.
UNCHANGED, TAGGED_NO_CV, RELICENSED_ND, DELETED, MADE_PRIVATE = 101, 102, 103, 104, 105
MANY_USER = "9000@N01"
MANY_PHOTOS = 1234  # public photos of MANY_USER: 3 pages of 500
MANY_FIRST_ID = 20000


def consent_world() -> World:
    """One photo per fate (owner 1000@N01 and one owner each) plus a user with many photos
    (ids MANY_FIRST_ID.., one of the old ones tagged 'No CV' and one relicensed all rights
    reserved)."""
    world = World().add(
        FakePhoto(UNCHANGED, "1@N01", 4, ("people", "beach")),
        FakePhoto(TAGGED_NO_CV, "2@N01", 5, ("people", "no_cv")),
        FakePhoto(RELICENSED_ND, "3@N01", 6, ("portrait",)),
        FakePhoto(DELETED, "4@N01", 4, (), deleted=True),
        FakePhoto(MADE_PRIVATE, "5@N01", 4, (), public=False),
    )
    for offset in range(MANY_PHOTOS):
        world.add(FakePhoto(MANY_FIRST_ID + offset, MANY_USER, 2, ("family",)))
    world.photos[MANY_FIRST_ID + 1].tags = ("No CV",)
    world.photos[MANY_FIRST_ID + 2].license_id = 0
    world.photos[MANY_FIRST_ID + 3].deleted = True
    return world


def mixed_world(groups: Iterable[tuple[int, int, int]]) -> tuple[World, list]:
    """A world of owners in groups of (owners, photos to check each, public photos each), and
    the records to check: each owner's oldest photos (the ones a 2014 snapshot holds)."""
    world, records, owner_index = World(), [], 0
    for owners, to_check, public in groups:
        for _ in range(owners):
            owner, first = f"{owner_index}@N02", 100_000 + owner_index * 100_000
            world.add(*(FakePhoto(first + n, owner) for n in range(public)))
            records += [make_record(first + n, user_nsid=owner) for n in range(to_check)]
            owner_index += 1
    return world, records


def _photo_tags(photo: FakePhoto) -> list[dict]:
    return [{"id": f"{photo.photo_id}-{index}", "author": photo.owner, "raw": raw,
             "_content": clean_tag(raw), "machine_tag": 0} for index, raw in enumerate(photo.tags)]


class FlickrApiFake(ThreadingHTTPServer):
    """The fake API server, bound to an ephemeral loopback port; see the module docstring."""

    daemon_threads = True

    def __init__(self, world: World, api_key: str = API_KEY):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, self))
        self.world = world
        self.api_key = api_key
        self.calls: Counter = Counter()
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True,
                                        name="fake-flickr-api")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{API_PATH}"

    def inject(self, *faults: str) -> None:
        """Answer the next requests with these faults (see FAULTS), in order."""
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {unknown}")
        with self._lock:
            self._faults.extend(faults)

    def start(self) -> "FlickrApiFake":
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()

    def answer(self, path: str, query: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request."""
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        with self._lock:
            self.calls[params.get("method", "")] += 1
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault != "ok":
            return _fault(fault)
        if path != API_PATH:
            return 404, {}, b"not found"
        if params.get("format") != "json" or params.get("nojsoncallback") != "1":
            return _fail(111, "Format \"rest\" not found")  # what a non-JSON request would get
        if params.get("api_key") != self.api_key:
            return _fail(100, "Invalid API Key (Key has invalid format)")
        method = params.get("method")
        if method == "flickr.photos.getInfo":
            return self._get_info(params)
        if method == "flickr.people.getPublicPhotos":
            return self._get_public_photos(params)
        if method == "flickr.photos.licenses.getInfo" and self.world.licenses is not None:
            return _ok({"licenses": {"license": [{"id": license_id, "name": name, "url": url}
                                                 for license_id, name, url in self.world.licenses]}})
        return _fail(112, f"Method \"{method}\" not found")

    def _get_info(self, params: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        photo = self.world.photos.get(int(params.get("photo_id", "0") or 0))
        if photo is None or photo.deleted or not photo.public:
            return _fail(1, "Photo not found")
        return _ok({"photo": {
            "id": str(photo.photo_id), "license": str(photo.license_id),
            "owner": {"nsid": photo.owner}, "visibility": {"ispublic": 1, "isfriend": 0,
                                                           "isfamily": 0},
            "tags": {"tag": _photo_tags(photo)}}})

    def _get_public_photos(self, params: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        owner = params.get("user_id", "")
        if owner not in self.world.owners():
            return _fail(1, "User not found")
        extras = set(params.get("extras", "").split(","))
        per_page = min(500, int(params.get("per_page", 100)))
        page = max(1, int(params.get("page", 1)))
        photos = self.world.public_photos(owner)
        listed = []
        for photo in photos[(page - 1) * per_page: page * per_page]:
            item = {"id": str(photo.photo_id), "owner": owner, "ispublic": 1, "isfriend": 0,
                    "isfamily": 0}
            if "license" in extras:
                item["license"] = str(photo.license_id)
            if "tags" in extras:
                item["tags"] = " ".join(tag["_content"] for tag in _photo_tags(photo))
            listed.append(item)
        return _ok({"photos": {"page": page, "pages": math.ceil(len(photos) / per_page),
                               "perpage": per_page, "total": len(photos), "photo": listed}})


def _ok(payload: dict) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({**payload, "stat": "ok"}).encode()


def _fail(code: int, message: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({"stat": "fail", "code": code, "message": message}).encode()


def _fault(fault: str) -> tuple[int, dict[str, str], bytes]:
    if fault == "429":
        return 429, {"Retry-After": "1"}, b"slow down"
    if fault == "429-long":
        return 429, {"Retry-After": "3600"}, b"slow down"
    if fault == "105":
        return _fail(105, "Service currently unavailable")
    if fault == "garbage":
        return 200, {}, b"<html>oops</html>"
    return int(fault), {}, b"server error"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms ACK wait

    def __init__(self, fake: FlickrApiFake, *args, **kwargs):
        self.fake = fake
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parsed = urlsplit(self.path)
        status, headers, body = self.fake.answer(parsed.path, parsed.query)
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(world: Optional[World] = None) -> FlickrApiFake:
    """A started fake serving `world` (default `consent_world()`); stop() it when done."""
    return FlickrApiFake(world if world is not None else consent_world()).start()


@pytest.fixture
def flickr_api() -> Iterable[FlickrApiFake]:
    """A fake Flickr API serving `consent_world()`, one per test."""
    fake = serve()
    yield fake
    fake.stop()
