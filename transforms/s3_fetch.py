"""Stage 3, fetch: download each candidate photo's bytes from an ordered list of image sources.

Sources come from a comma-separated spec (`--image_source`), tried in order until one serves the
photo:

* `mirror:PREFIX`: the Multimedia Commons layout PREFIX/data/images/{h[:3]}/{h[3:6]}/{h}.jpg with
  h = the YFCC hash column. An http(s) PREFIX goes through the HTTP client below; any other PREFIX
  (a local directory, gs://...) through Beam `FileSystems`.
* `flickr` / `flickr:SUFFIX`: the record's download URL, or its https://live.staticflickr.com/
  form with a size suffix (z = 640 px, b = 1024 px, ...). Opt-in: the Webscope terms ask users
  not to hammer Flickr.

The HTTP client is a plain class (`ImageFetcher`, testable without Beam) built on urllib3: one
`PoolManager` per worker, connect/read/total timeouts, retries with exponential backoff + jitter on
429/5xx/connection errors honouring a capped Retry-After, a per-host concurrency cap, an overall
token-bucket rate cap and a byte cap per response. Redirects are followed by hand so that each hop
goes through the SSRF guard (`check_url`) again and Flickr's "photo unavailable" placeholder is
caught by its redirect target. The guard resolves the host itself and the connection is made to the
address it checked (Host header and TLS SNI/hostname check carry the name), so a DNS answer that
changes between check and connect (DNS rebinding) cannot steer a request to a private address.

`FetchImages` wraps it in a DoFn that keeps many fetches in flight on a thread pool and emits
`FetchedImage` on "main" and `Rejected` (stage 'fetch') on "rejects".
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import itertools
import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union
from urllib.parse import urljoin, urlsplit

import apache_beam as beam
import urllib3
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue
from urllib3.exceptions import (ConnectTimeoutError, MaxRetryError, ProtocolError, ReadTimeoutError,
                                SSLError)
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from transforms.image_checks import quick_check
from transforms.mirror_layout import MIRROR_EXTENSIONS, BadMirrorHash, is_mirror_hash, mirror_path
from transforms.rate_limit import process_rate_share
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, FetchedImage, StoredPhoto, YfccRecord
from transforms.rejects import reject
from transforms.stage import StageOutput, WindowedStageDoFn, stage_output
from transforms.yfcc_format import photo_hash

STAGE = "fetch"

# Flickr size suffixes served from the photo's own secret (larger sizes have other secrets).
FLICKR_SUFFIXES = ("s", "q", "t", "m", "n", "w", "z", "c", "b")
FLICKR_STATIC_URL = "https://live.staticflickr.com/{server}/{photo_id}_{secret}_{suffix}.jpg"

# Hosts that may be fetched from without being named in the spec.
FLICKR_HOST_PATTERNS = (
    re.compile(r"farm\d+\.staticflickr\.com"),
    re.compile(r"live\.staticflickr\.com"),
    re.compile(r"[a-z0-9-]+\.static\.flickr\.com"),
)
MIRROR_HOSTS = frozenset({
    "multimedia-commons.s3-us-west-2.amazonaws.com",
    "multimedia-commons.s3.us-west-2.amazonaws.com",
    "multimedia-commons.s3.amazonaws.com",
})
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_FOUND_STATUSES = frozenset({404, 410})
PLACEHOLDER_MARKER = "photo_unavailable"
# X-Robots-Tag directives that withhold consent to use an image (img2dataset's default list).
DEFAULT_X_ROBOTS_TAG_DIRECTIVES = ("noai", "noimageai", "noimageindex", "noindex")
# The user agent token that X-Robots-Tag "<agent>: <directives>" values addressed to us use.
ROBOTS_AGENT_TOKEN = "fdh-beam"
# X-Robots-Tag directives whose own syntax has a ':' (not a user agent prefix).
_ROBOTS_COLON_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                      "max-video-preview"})

# Every reason a fetch can fail with (the last one of a record becomes its reject reason).
FETCH_REASONS = ("not_found", "http_error", "timeout", "too_large", "unavailable", "disallowed_url",
                 "disallowed_redirect", "connection_error", "retries_exhausted", "html", "no_url",
                 "bad_hash", "bad_image", "x_robots_tag")


# --------------------------------------------------------------------------------------------
# Image sources


@dataclass(frozen=True)
class ImageSource:
    """One place photos can come from: `kind` 'mirror' (with `prefix`) or 'flickr' (`suffix`)."""

    kind: str
    prefix: str = ""
    suffix: str = ""

    @property
    def is_http(self) -> bool:
        """True when locations of this source are fetched over HTTP(S)."""
        return self.kind == "flickr" or urlsplit(self.prefix).scheme in DEFAULT_PORTS

    @property
    def name(self) -> str:
        """Short label for rejects' details."""
        return f"{self.kind}:{self.suffix}" if self.suffix else self.kind

    def location(self, record: YfccRecord) -> Optional[str]:
        """The URL or path of `record`'s photo in this source; None when the record lacks the keys."""
        locations = self.locations(record)
        return locations[0] if locations else None

    def locations(self, record: YfccRecord) -> tuple[str, ...]:
        """Where `record`'s photo may be in this source, tried in order while each is not found.

        The mirror stores a few photos as .png or .gif instead of .jpg (design section 3). A
        malformed hash (not 16-32 lowercase hex: '../..', a path) is recomputed from the download
        URL; without one, BadMirrorHash is raised, so no path ever leaves the mirror's prefix.
        """
        if self.kind == "mirror":
            h = mirror_hash(record)
            if h is None:
                return ()
            return tuple(mirror_path(self.prefix, h, ext) for ext in MIRROR_EXTENSIONS)
        url = self._flickr_url(record)
        return (url,) if url else ()

    def _flickr_url(self, record: YfccRecord) -> Optional[str]:
        if self.suffix:
            if not (record.server_id and record.secret):
                return None
            return FLICKR_STATIC_URL.format(server=record.server_id, photo_id=record.photo_id,
                                            secret=record.secret, suffix=self.suffix)
        return record.download_url or None


def mirror_hash(record: YfccRecord) -> Optional[str]:
    """The record's well-formed mirror hash: its hash column, or one recomputed from its download
    URL when the column is malformed; None when it is empty; raises BadMirrorHash for a malformed
    hash without a URL."""
    h = record.photo_hash
    if not h or is_mirror_hash(h):
        return h or None
    if record.download_url:
        return photo_hash(record.download_url)
    raise BadMirrorHash(f"mirror hash {h[:80]!r} is not 16-32 lowercase hex and the record "
                        f"has no download URL to recompute it from")
    return None


def parse_image_sources(spec: str) -> tuple[ImageSource, ...]:
    """Parse 'mirror:PREFIX,flickr,flickr:z' into ImageSources; raise ValueError on a bad spec."""
    parts = [part.strip() for part in (spec or "").split(",") if part.strip()]
    if not parts:
        raise ValueError("empty image source spec: expected e.g. 'mirror:gs://bucket/yfcc,flickr'")
    sources = []
    for part in parts:
        kind, _, arg = part.partition(":")
        if kind == "flickr":
            if arg and arg not in FLICKR_SUFFIXES:
                raise ValueError(f"bad Flickr size suffix {arg!r} in image source {part!r}: "
                                 f"expected one of {', '.join(FLICKR_SUFFIXES)}")
            sources.append(ImageSource("flickr", suffix=arg))
        elif kind == "mirror":
            sources.append(ImageSource("mirror", prefix=_validate_prefix(arg.rstrip("/"), part)))
        else:
            raise ValueError(f"unknown image source {part!r}: expected 'mirror:PREFIX', 'flickr' "
                             f"or 'flickr:SUFFIX'")
    return tuple(sources)


def _validate_prefix(prefix: str, part: str) -> str:
    if not prefix:
        raise ValueError(f"image source {part!r} has no prefix: expected 'mirror:PREFIX'")
    parsed = urlsplit(prefix)
    if parsed.scheme in DEFAULT_PORTS:
        try:
            host = parsed.hostname
            parsed.port  # raises ValueError on a bad port
        except ValueError as error:
            raise ValueError(f"bad port in image source {part!r}: {error}") from None
        if not host or "@" in parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"bad mirror URL in image source {part!r}: expected "
                             f"http(s)://host[:port][/path] without user, query or fragment")
        literal = _ip_literal(host)
        if literal is not None and not literal.is_loopback:
            raise ValueError(f"image source {part!r}: IP-literal hosts are not allowed "
                             f"(loopback only, for local tests)")
        return prefix
    try:
        FileSystems.get_filesystem(prefix)
    except ValueError as error:
        raise ValueError(f"image source {part!r}: no Beam filesystem for {prefix!r} ({error})") from None
    return prefix


# --------------------------------------------------------------------------------------------
# SSRF guard


class DisallowedUrl(ValueError):
    """A URL the fetcher must not request (not an allowed host, or resolves to a private address)."""


class ResolveError(OSError):
    """The host name of an allowed URL did not resolve."""


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts may be fetched: the built-in Flickr/mirror hosts plus the configured prefixes'.

    `extra` holds (host, port) of http(s) mirror prefixes; `loopback` those whose host is a loopback
    name or address (local tests), which are allowed at exactly that host:port and must resolve to
    loopback addresses.
    """

    extra: frozenset = frozenset()
    loopback: frozenset = frozenset()

    @classmethod
    def for_sources(cls, sources: Iterable[ImageSource]) -> "HostPolicy":
        extra, loopback = set(), set()
        for source in sources:
            if source.kind != "mirror" or not source.is_http:
                continue
            parsed = urlsplit(source.prefix)
            key = (parsed.hostname.rstrip("."), parsed.port or DEFAULT_PORTS[parsed.scheme])
            literal = _ip_literal(key[0])
            if key[0] in LOOPBACK_NAMES or (literal is not None and literal.is_loopback):
                loopback.add(key)
            else:
                extra.add(key)
        return cls(frozenset(extra), frozenset(loopback))


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to `address`, send `host_header`, verify TLS against `host`."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    host_header: str
    request_path: str


Resolver = Callable[[str, int], Sequence[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """The IP addresses `host` resolves to for TCP (system resolver)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise ResolveError(f"cannot resolve {host}: {error}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def _ip_literal(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (not private, loopback, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def is_allowed_host(host: str, port: int, scheme: str, policy: HostPolicy) -> bool:
    """Host allow-list: Flickr static hosts and the mirror on default ports, or a configured prefix."""
    if (host, port) in policy.extra or (host, port) in policy.loopback:
        return True
    if port != DEFAULT_PORTS[scheme]:
        return False
    return host in MIRROR_HOSTS or is_flickr_host(host)


def is_flickr_host(host: str) -> bool:
    """True for Flickr's static image hosts (farmN.staticflickr.com, live.staticflickr.com, ...)."""
    return any(pattern.fullmatch(host) for pattern in FLICKR_HOST_PATTERNS)


def check_url(url: str, policy: HostPolicy, resolve: Resolver = resolve_host) -> Target:
    """Check `url` against the SSRF rules and pin the address to connect to.

    Raises DisallowedUrl (bad scheme, user info, IP literal, host not allowed, any resolved address
    not public) or ResolveError. Only a configured loopback prefix may resolve to loopback.
    """
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError as error:
        raise DisallowedUrl(f"unparsable URL: {error}") from None
    scheme = parsed.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise DisallowedUrl(f"scheme {scheme or '(none)'!r} not allowed")
    if "@" in parsed.netloc:
        raise DisallowedUrl("user info in URL not allowed")
    host = (parsed.hostname or "").rstrip(".")
    if not host:
        raise DisallowedUrl("URL has no host")
    port = port or DEFAULT_PORTS[scheme]
    loopback = (host, port) in policy.loopback
    if not loopback and (_ip_literal(host) is not None or re.fullmatch(r"[0-9.]+|0x[0-9a-f.x]+", host)):
        raise DisallowedUrl(f"IP-literal host {host} not allowed")
    if not is_allowed_host(host, port, scheme, policy):
        raise DisallowedUrl(f"host {host}:{port} not allowed")
    addresses = resolve(host, port)
    if not addresses:
        raise ResolveError(f"{host} resolved to no address")
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if loopback and not ip.is_loopback:
            raise DisallowedUrl(f"loopback source {host} resolved to non-loopback {address}")
        if not loopback and not is_public_address(address):
            raise DisallowedUrl(f"{host} resolves to non-public address {address}")
    default_port = port == DEFAULT_PORTS[scheme]
    host_header = host if default_port else f"{parsed.hostname}:{port}"
    if ":" in host and not default_port:
        host_header = f"[{host}]:{port}"
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0],
                  host_header=host_header, request_path=path)


# --------------------------------------------------------------------------------------------
# The fetch client


@dataclass(frozen=True)
class FetchConfig:
    """Network knobs of the fetch client (per worker process)."""

    threads: int = 64  # fetches in flight per DoFn instance
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0  # wall clock per URL, all tries, headers + body (stops slow drips)
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 3  # retries after the first try, for 429/5xx/connection errors/timeouts
    backoff_factor: float = 0.5  # sleep backoff_factor * 2**(n-1) (+ jitter) before retry n
    backoff_jitter: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # cap on an honoured Retry-After
    max_redirects: int = 5
    per_host_concurrency: int = 16
    requests_per_second: Optional[float] = None  # token bucket over all hosts; None = no cap
    # Flickr's own hosts get a stricter cap (the Webscope terms ask users not to hammer Flickr):
    # per worker process here; `FetchImages(..., processes=N)` reads them as the whole job's and
    # gives each of the N processes its share (`process_share`). The mirror is not slowed by it.
    flickr_concurrency: int = 4
    flickr_requests_per_second: Optional[float] = 4.0
    # Before settling for a source's bytes while later sources remain, check them the way decode
    # will (transforms.image_checks.quick_check, a draft-scale decode) and try the next on garbage.
    check_before_fallback: bool = True
    dns_cache_seconds: float = 60.0
    # Responses whose X-Robots-Tag holds one of these (for all agents or for fdh-beam) are
    # rejected as 'x_robots_tag'; () turns the check off.
    x_robots_tag_directives: tuple[str, ...] = DEFAULT_X_ROBOTS_TAG_DIRECTIVES
    user_agent: str = "fdh-beam/0.1 (Flickr Diverse Humans rebuild; +https://github.com/hukkelas/FDH)"


class _CappedRetry(Retry):
    """urllib3 Retry whose honoured Retry-After is capped (a server may ask for hours)."""

    def __init__(self, *args, retry_after_max: float = 60.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after_max = retry_after_max

    def new(self, **kwargs) -> "_CappedRetry":
        retry = super().new(**kwargs)
        retry.retry_after_max = self.retry_after_max
        return retry

    def get_retry_after(self, response) -> Optional[float]:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.retry_after_max)


class TokenBucket:
    """Thread-safe token bucket: `acquire()` blocks so that calls average <= `rate` per second."""

    def __init__(self, rate: float, burst: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0  # reserve, possibly going negative: later callers wait longer
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class DeadlineWatchdog:
    """Shuts down a connection's socket when its request's wall-clock deadline passes.

    Socket timeouts bound each recv, not the whole response: a server dripping one byte per
    second never trips them. One daemon thread per worker keeps a heap of (deadline, connection);
    shutting the socket down makes the blocked read return, so headers and body both end at the
    deadline. Entries are cancelled when their request is done.
    """

    def __init__(self):
        self._heap: list[tuple[float, int, list]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def arm(self, connection: HTTPConnection, deadline: float) -> list:
        """Watch `connection` until `deadline` (time.monotonic); returns the entry to cancel."""
        entry = [connection]
        with self._wake:
            heapq.heappush(self._heap, (deadline, next(self._counter), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fdh-fetch-deadline",
                                                daemon=True)
                self._thread.start()
            if self._heap[0][2] is entry:  # the earliest deadline now: wake the thread to re-wait
                self._wake.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[0] = None

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][2][0] is None:
                    heapq.heappop(self._heap)
                now = time.monotonic()
                if not self._heap or self._heap[0][0] > now:
                    self._wake.wait(self._heap[0][0] - now if self._heap else None)
                    continue
                entry = heapq.heappop(self._heap)[2]
            connection, entry[0] = entry[0], None
            if connection is not None:
                _shut_down(connection)


def _shut_down(connection: HTTPConnection) -> None:
    """Make any read blocked on `connection` return now (plain socket shutdown, also under TLS).

    http.client drops `connection.sock` when a response is read until close (no Content-Length):
    the socket kept at connect time is used then."""
    sock = getattr(connection, "sock", None) or getattr(connection, "watched_sock", None)
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


# The deadline of the request the current fetch thread is making, read by the connections below.
_request_deadline = threading.local()


class _WatchedRequests:
    """Mixin for urllib3 connections: each request is watched until the thread's deadline."""

    watchdog: DeadlineWatchdog
    watched_sock = None

    def connect(self) -> None:
        super().connect()
        self.watched_sock = self.sock
        deadline = getattr(_request_deadline, "value", None)
        if deadline is not None and time.monotonic() >= deadline:  # the watchdog fired meanwhile
            _shut_down(self)

    def request(self, *args, **kwargs):
        deadline = getattr(_request_deadline, "value", None)
        if deadline is not None:
            if time.monotonic() >= deadline:  # a retry after the deadline: do not even send
                raise socket.timeout("total deadline passed before the request")
            _request_deadline.entries.append(self.watchdog.arm(self, deadline))
        return super().request(*args, **kwargs)


def _watched_pool_classes(watchdog: DeadlineWatchdog) -> dict:
    """PoolManager pool classes (http, https) whose connections are watched by `watchdog`."""
    http_connection = type("_WatchedHTTPConnection", (_WatchedRequests, HTTPConnection),
                           {"watchdog": watchdog})
    https_connection = type("_WatchedHTTPSConnection", (_WatchedRequests, HTTPSConnection),
                            {"watchdog": watchdog})
    return {
        "http": type("_WatchedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_connection}),
        "https": type("_WatchedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_connection}),
    }


def robots_refusal(values: Sequence[str], directives: Sequence[str],
                   agent: str = ROBOTS_AGENT_TOKEN) -> Optional[str]:
    """The first of `directives` that X-Robots-Tag header `values` apply to us, else None.

    A value is a comma-separated directive list, optionally prefixed 'agent:' (then it applies
    only when agent is ours or '*'); 'unavailable_after: DATE' and the like are not prefixes.
    """
    wanted = {directive.lower() for directive in directives}
    for value in values:
        parts = [part.strip().lower() for part in value.split(",")]
        head, colon, rest = parts[0].partition(":")
        if colon and head.strip() not in _ROBOTS_COLON_DIRECTIVES:
            if head.strip() not in (agent.lower(), "*"):
                continue
            parts[0] = rest.strip()
        for part in parts:
            if part in wanted:
                return part
    return None


class FetchFailure(Exception):
    """One source failed for one record: a reason from FETCH_REASONS and a short detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FetchAttempt:
    """A failed try of one source for one record."""

    source: str
    reason: str
    detail: str


@dataclass
class FetchOutcome:
    """What fetching one record gave: the image, or None with the failed attempts."""

    record: YfccRecord
    image: Optional[FetchedImage]
    attempts: list[FetchAttempt]
    bytes_read: int = 0

    @property
    def reason(self) -> str:
        """Reject reason: 'not_found' if every source said so, else the last other failure."""
        reasons = [a.reason for a in self.attempts if a.reason not in ("not_found", "no_url")]
        if reasons:
            return reasons[-1]
        return "not_found"

    @property
    def detail(self) -> str:
        return "; ".join(f"{a.source} {a.reason}" + (f": {a.detail}" if a.detail else "")
                         for a in self.attempts)


def _tried(detail: str, locations: Sequence[str]) -> str:
    """A failure's detail followed by the URLs or paths that were tried (finding 10)."""
    where = "tried " + ", ".join(locations)
    return f"{detail}; {where}" if detail else where


def _error_reason(error: BaseException) -> str:
    if isinstance(error, (ConnectTimeoutError, ReadTimeoutError, Urllib3TimeoutError, TimeoutError)):
        return "timeout"
    return "connection_error"


class ImageFetcher:
    """Fetch one record's photo from the first source that serves it (thread-safe, no Beam).

    One instance per worker: it owns a urllib3 PoolManager, per-host semaphores, the token bucket
    and a small DNS cache. Call `fetch(record)` from many threads; `close()` when done.
    """

    def __init__(self, sources: Sequence[ImageSource], config: FetchConfig = FetchConfig(),
                 resolve: Resolver = resolve_host):
        self.sources = tuple(sources)
        self.config = config
        self.policy = HostPolicy.for_sources(self.sources)
        self._resolve_uncached = resolve
        self._dns_cache: dict[tuple[str, int], tuple[float, Sequence[str]]] = {}
        self._semaphores: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._bucket = TokenBucket(config.requests_per_second) if config.requests_per_second else None
        self._flickr_bucket = (TokenBucket(config.flickr_requests_per_second)
                               if config.flickr_requests_per_second else None)
        self._timeout = urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout)
        self._retry = _CappedRetry(
            total=config.retries, connect=config.retries, read=config.retries,
            status=config.retries, other=0, redirect=False, raise_on_redirect=False,
            status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
            backoff_factor=config.backoff_factor, backoff_jitter=config.backoff_jitter,
            backoff_max=config.backoff_max, respect_retry_after_header=True,
            raise_on_status=False, retry_after_max=config.retry_after_max)
        self._pools = urllib3.PoolManager(
            num_pools=256, maxsize=max(1, min(config.threads, config.per_host_concurrency)),
            block=False, headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.5"})
        self._pools.pool_classes_by_scheme = _watched_pool_classes(DeadlineWatchdog())

    def close(self) -> None:
        self._pools.clear()

    # -- per-record -------------------------------------------------------------------------

    def fetch(self, record: YfccRecord) -> FetchOutcome:
        """Try each source in order; the first body that passes `quick_check` wins (the last
        source's is taken as it is: decode judges it)."""
        attempts: list[FetchAttempt] = []
        bytes_read = 0
        fallback: Optional[FetchedImage] = None
        for source in self.sources:
            try:
                locations = source.locations(record)
            except BadMirrorHash as error:
                attempts.append(FetchAttempt(source.name, "bad_hash", str(error)))
                continue
            if not locations:
                attempts.append(FetchAttempt(source.name, "no_url", "record lacks hash/url fields"))
                continue
            for tried, location in enumerate(locations, start=1):  # next one while not found
                try:
                    if source.is_http:
                        data, final_url = self.fetch_url(location)
                    else:
                        data, final_url = self.fetch_file(location), location
                except FetchFailure as failure:
                    if failure.reason == "not_found" and tried < len(locations):
                        continue
                    attempts.append(FetchAttempt(source.name, failure.reason,
                                                 _tried(failure.detail, locations[:tried])))
                    break
                except Exception as error:  # a bug or an unforeseen library error: never lose the record
                    logging.exception("unexpected error fetching %s", location)
                    attempts.append(FetchAttempt(source.name, "connection_error", _tried(
                        f"{type(error).__name__}: {error}", locations[:tried])))
                    break
                bytes_read += len(data)
                image = FetchedImage(record=record, data=data, url=final_url, source=source.kind)
                problem = (quick_check(data) if self.config.check_before_fallback
                           and source is not self.sources[-1] else None)
                if problem is None:
                    return FetchOutcome(record, image, attempts, bytes_read)
                # Garbage from this source (a near-blank mirror object, say): try the next one,
                # keeping these bytes so that decode rejects them with the exact reason if the
                # others have nothing better.
                attempts.append(FetchAttempt(source.name, "bad_image", _tried(
                    f"{problem.reason}: {problem.detail}", (location,))))
                fallback = fallback or image
                break
        return FetchOutcome(record, fallback, attempts, bytes_read)

    def fetch_file(self, path: str) -> bytes:
        """Read `path` through Beam FileSystems (local, gs://, ...) with the byte cap."""
        scheme = path.split("://", 1)[0] if "://" in path else "file"
        bucket = path.split("/")[2] if "://" in path else ""
        with self._host_semaphore(f"{scheme}://{bucket}"):
            try:
                with FileSystems.open(path, mime_type="application/octet-stream",
                                      compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    data = handle.read(self.config.max_bytes + 1)
            except Exception as error:  # FileNotFoundError locally, NotFound from GCS, ...
                if isinstance(error, FileNotFoundError) or "NotFound" in type(error).__name__ \
                        or "not found" in str(error).lower():
                    raise FetchFailure("not_found") from None
                raise FetchFailure("connection_error", f"{type(error).__name__}: {error}") from None
        if len(data) > self.config.max_bytes:
            raise FetchFailure("too_large", f"> {self.config.max_bytes} bytes")
        return data

    def fetch_url(self, url: str) -> tuple[bytes, str]:
        """GET `url`, following up to max_redirects guarded hops; returns (body, final URL)."""
        for hop in range(self.config.max_redirects + 1):
            try:
                target = check_url(url, self.policy, self._resolve)
            except DisallowedUrl as error:
                raise FetchFailure("disallowed_redirect" if hop else "disallowed_url", str(error)) from None
            except ResolveError as error:
                raise FetchFailure("connection_error", str(error)) from None
            status, headers, body, tries = self._request(target)
            if status in REDIRECT_STATUSES:
                location = headers.get("Location")
                if not location:
                    raise FetchFailure("http_error", f"HTTP {status} without Location")
                url = urljoin(url, location)
                if PLACEHOLDER_MARKER in url:
                    raise FetchFailure("unavailable", f"redirected to {url[:120]}")
                continue
            if status == 200:
                refused = robots_refusal(headers.getlist("X-Robots-Tag"),
                                         self.config.x_robots_tag_directives)
                if refused:
                    raise FetchFailure("x_robots_tag", f"X-Robots-Tag {refused} at {url[:200]}")
                content_type = headers.get("Content-Type", "").lower()
                if content_type.startswith("text/html") or body.lstrip()[:1] == b"<":
                    raise FetchFailure("html", f"Content-Type {content_type or '?'}")
                return body, url
            if status in NOT_FOUND_STATUSES:
                raise FetchFailure("not_found", f"HTTP {status}")
            if status in RETRY_STATUSES:
                raise FetchFailure("retries_exhausted", f"HTTP {status} after {tries} tries")
            raise FetchFailure("http_error", f"HTTP {status}")
        raise FetchFailure("http_error", f"more than {self.config.max_redirects} redirects")

    # -- plumbing ---------------------------------------------------------------------------

    def _resolve(self, host: str, port: int) -> Sequence[str]:
        key = (host, port)
        cached = self._dns_cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        addresses = self._resolve_uncached(host, port)
        self._dns_cache[key] = (now + self.config.dns_cache_seconds, addresses)
        return addresses

    def _host_semaphore(self, host_key: str, limit: Optional[int] = None) -> threading.BoundedSemaphore:
        semaphore = self._semaphores.get(host_key)
        if semaphore is None:
            with self._lock:
                semaphore = self._semaphores.setdefault(
                    host_key, threading.BoundedSemaphore(limit or self.config.per_host_concurrency))
        return semaphore

    def host_limits(self, host: str, port: int) -> tuple[threading.BoundedSemaphore, list[TokenBucket]]:
        """The concurrency cap and the rate buckets a request to host:port waits on."""
        buckets = [self._bucket] if self._bucket is not None else []
        if is_flickr_host(host):
            limit = min(self.config.per_host_concurrency, self.config.flickr_concurrency)
            if self._flickr_bucket is not None:
                buckets.append(self._flickr_bucket)
            return self._host_semaphore(f"{host}:{port}", limit), buckets
        return self._host_semaphore(f"{host}:{port}"), buckets

    def _request(self, target: Target) -> tuple[int, urllib3.HTTPHeaderDict, bytes, int]:
        """One guarded GET (with retries) to the pinned address; (status, headers, body, tries)."""
        pool = self._pools.connection_from_host(
            target.address, target.port, target.scheme,
            pool_kwargs={"server_hostname": target.host, "assert_hostname": target.host}
            if target.scheme == "https" else None)
        retries: Retry = self._retry
        semaphore, buckets = self.host_limits(target.host, target.port)
        with semaphore:
            for bucket in buckets:
                bucket.acquire()
            _request_deadline.entries = []
            try:
                return self._request_with_retries(pool, target, retries)
            finally:
                for entry in _request_deadline.entries:
                    DeadlineWatchdog.cancel(entry)
                _request_deadline.value = None
                _request_deadline.entries = []

    def _request_with_retries(self, pool: HTTPConnectionPool, target: Target, retries: Retry
                              ) -> tuple[int, urllib3.HTTPHeaderDict, bytes, int]:
        """The GET loop of `_request`: all tries end by one wall-clock deadline (headers + body)."""
        deadline = time.monotonic() + self.config.total_timeout
        _request_deadline.value = deadline
        while True:
            try:
                response = pool.urlopen(
                    "GET", target.request_path, headers={"Host": target.host_header},
                    retries=retries, redirect=False, assert_same_host=False,
                    preload_content=False, release_conn=False, timeout=self._timeout)
            except MaxRetryError as error:
                reason = error.reason or error
                self._check_deadline(deadline, "headers")
                raise FetchFailure(_error_reason(reason), f"{type(reason).__name__}: {reason}"[:200]) \
                    from None
            except (ProtocolError, SSLError, Urllib3TimeoutError, OSError) as error:
                self._check_deadline(deadline, "headers")
                raise FetchFailure(_error_reason(error), f"{type(error).__name__}: {error}"[:200]) \
                    from None
            retries = response.retries or retries
            tries = len(retries.history) + 1
            if response.status != 200:
                self._discard(response)
                return response.status, response.headers, b"", tries
            try:
                body = self._read_capped(response, deadline)
            except (ProtocolError, ReadTimeoutError, SSLError, OSError) as error:
                response.close()
                response.release_conn()
                self._check_deadline(deadline, "body")
                try:
                    retries = retries.increment("GET", target.url, error=error)
                except (MaxRetryError, ProtocolError, ReadTimeoutError, SSLError, OSError):
                    detail = f"{type(error).__name__} in body: {error}"[:200]
                    raise FetchFailure(_error_reason(error), detail) from None
                retries.sleep()
                continue
            response.release_conn()
            return 200, response.headers, body, tries

    def _check_deadline(self, deadline: float, part: str) -> None:
        """Raise the 'timeout' failure when an error came from the watchdog ending the request."""
        if time.monotonic() >= deadline - 0.05:
            raise FetchFailure("timeout", f"{part} not complete after {self.config.total_timeout}s")

    @staticmethod
    def _discard(response: urllib3.BaseHTTPResponse) -> None:
        """Drop a response we will not use: drain a small body (keeps the connection), else close."""
        length = response.headers.get("Content-Length", "")
        try:
            if length.isdigit() and int(length) <= 64 * 1024:
                response.drain_conn()
            else:
                response.close()
        except Exception:  # a broken connection: nothing to keep
            response.close()
        response.release_conn()

    def _read_capped(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        max_bytes = self.config.max_bytes
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            response.close()
            raise FetchFailure("too_large", f"Content-Length {length} > {max_bytes}")
        chunks, size = [], 0
        for chunk in response.stream(256 * 1024):
            size += len(chunk)
            if size > max_bytes:
                response.close()
                raise FetchFailure("too_large", f"body > {max_bytes} bytes")
            if time.monotonic() > deadline:
                response.close()
                raise FetchFailure("timeout", f"body not complete after {self.config.total_timeout}s")
            chunks.append(chunk)
        if time.monotonic() >= deadline:  # the watchdog ended a body without Content-Length
            raise FetchFailure("timeout", f"body not complete after {self.config.total_timeout}s")
        return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Beam wrapper


class _FetchDoFn(WindowedStageDoFn):
    """Keeps up to 2 x threads fetches in flight per DoFn instance; emits results as they finish."""

    stage = STAGE

    def __init__(self, sources: Sequence[ImageSource], config: FetchConfig):
        self._sources = tuple(sources)
        self._config = config
        self._fetched = Metrics.counter(METRICS_NAMESPACE, "fetch.ok")
        self._bytes = Metrics.counter(METRICS_NAMESPACE, "fetch.bytes")

    def setup(self) -> None:
        self._fetcher = ImageFetcher(self._sources, self._config)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._config.threads, thread_name_prefix="fdh-fetch")
        self._max_in_flight = 2 * self._config.threads

    def start_bundle(self) -> None:
        self._pending: dict[concurrent.futures.Future, tuple] = {}

    def process_element(self, record: YfccRecord, timestamp=None, window=None) -> Iterator:
        if isinstance(record, StoredPhoto):  # a re-derive's photo that needs no pixels
            yield record
            return
        future = self._executor.submit(self._fetcher.fetch, record)
        self._pending[future] = (timestamp, window)
        if len(self._pending) >= self._max_in_flight:
            done, _ = concurrent.futures.wait(self._pending, return_when=concurrent.futures.FIRST_COMPLETED)
            yield from self._emit(done)

    def finish_bundle(self) -> Iterator:
        yield from self._emit(concurrent.futures.wait(self._pending).done)

    def teardown(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        fetcher = getattr(self, "_fetcher", None)
        if fetcher is not None:
            fetcher.close()

    def _emit(self, done: Iterable[concurrent.futures.Future]) -> Iterator:
        """Outputs of finished fetches, in their input's window (counters on the bundle thread)."""
        for future in done:
            timestamp, window = self._pending.pop(future)
            outcome: FetchOutcome = future.result()  # fetch() never raises
            for attempt in outcome.attempts:
                Metrics.counter(METRICS_NAMESPACE, f"fetch.attempt_{attempt.reason}").inc()
            self._bytes.inc(outcome.bytes_read)
            if outcome.image is not None:
                self._fetched.inc()
                Metrics.counter(METRICS_NAMESPACE, f"fetch.ok_{outcome.image.source}").inc()
                yield WindowedValue(outcome.image, timestamp, (window,))
            else:
                record = outcome.record
                tagged = reject(STAGE, outcome.reason, str(record.photo_id), outcome.detail,
                                photo_id=record.photo_id, user_nsid=record.user_nsid)
                yield beam.pvalue.TaggedOutput(tagged.tag, WindowedValue(tagged.value, timestamp, (window,)))


def process_share(config: FetchConfig, processes: int) -> FetchConfig:
    """`config` with its Flickr rate and concurrency, given for the whole job, cut to the share of
    one of the job's `processes` (max_num_workers x SDK processes per worker) that do not talk to
    each other: the rate through `transforms.rate_limit.process_rate_share`, the concurrency
    floored but at least 1 per process (a job with more processes than --flickr_concurrency
    can have up to one request per process in flight)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    rate = config.flickr_requests_per_second
    return dataclasses.replace(
        config, flickr_concurrency=max(1, config.flickr_concurrency // processes),
        flickr_requests_per_second=None if not rate else process_rate_share(rate, processes))


class FetchImages(beam.PTransform):
    """YfccRecord -> StageOutput(main=FetchedImage, rejects=Rejected), from the first source that serves it.
    A `StoredPhoto` (a re-derive's photo that needs no pixels) passes through unfetched.

    `image_source` is a spec such as 'mirror:gs://bucket/yfcc,flickr' (see module docstring);
    it is parsed here, so a bad spec fails at pipeline construction.
    """

    def __init__(self, image_source: Union[str, Sequence[ImageSource]],
                 config: Optional[FetchConfig] = None, processes: Optional[int] = None,
                 **config_overrides):
        """`processes`: when given, the Flickr rate and concurrency are the whole job's, shared
        out over that many worker processes (`process_share`); None: they are per process."""
        super().__init__()
        self._sources = (parse_image_sources(image_source) if isinstance(image_source, str)
                         else tuple(image_source))
        if not self._sources:
            raise ValueError("FetchImages needs at least one image source")
        self._config = dataclasses.replace(config or FetchConfig(), **config_overrides)
        if processes is not None:
            self._config = process_share(self._config, processes)
        if self._config.threads < 1 or self._config.per_host_concurrency < 1:
            raise ValueError("threads and per_host_concurrency must be >= 1")

    def expand(self, records: beam.PCollection) -> StageOutput:
        return stage_output(records | "FetchBytes" >> beam.ParDo(
            _FetchDoFn(self._sources, self._config)).with_outputs(REJECTS_TAG, main="main"))

