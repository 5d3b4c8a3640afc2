"""The consent check: ask Flickr, at build time, whether each photo's owner still allows its use.

FDH tells people how to leave the dataset: tag the photo `no_cv`, change its licence to
all-rights-reserved or a NoDerivs licence, make it private, or delete it. YFCC100M is a 2014
snapshot and the mirror keeps every photo, so only Flickr's REST API knows the current state.

Per photo the answer is a `ConsentResult`: ok, or a reject reason (stage 'consent'):

* `not_found`: deleted, private or of a deleted account (getInfo's `stat: fail` code 1, or
  getPublicPhotos' code 1 "user not found");
* `not_public`: Flickr answers but the photo is not public (`ispublic` 0);
* `no_cv_tag`: a tag whose clean form is an opt-out tag (`transforms.tags`; any author, so that
  both methods below decide alike: getPublicPhotos gives no tag authors);
* `license_changed`: the licence is not a CC licence or public-domain tool that permits
  derivatives, or its id is unknown. Ids 0-10 are a table verified against a recorded
  flickr.photos.licenses.getInfo answer (`FLICKR_LICENSES`); any other id (Flickr's CC 4.0
  licences, say) makes the client ask licenses.getInfo once (`FlickrClient.licenses`, counted in
  `calls`) and classify each licence by its URL (`license_from_info`): allowed iff it is a
  creativecommons.org/licenses/CODE/ URL whose CODE has no "nd", or publicdomain/zero or
  publicdomain/mark. No URL, ND, an id the list lacks, or a list refused or unreadable ->
  `license_changed`, the detail naming the id or URL; a list still failing after the retries ->
  `check_failed` (asked again for the next such photo);
* `check_failed`: Flickr kept failing (HTTP 5xx/429, code 105, connection errors) after the
  retries, or gave an error or an answer we cannot read. Never a silent keep.

Two methods, chosen per user to spend fewer calls (`ConsentChecker.check_user`):

* `flickr.photos.getInfo`: one call per photo.
* `flickr.people.getPublicPhotos` with `extras=license,tags`, `per_page=500`: one call per 500 of
  the user's public photos, newest first (YFCC photos, from before 2014, sit on the last pages).

The rule: a user with fewer than `listing_min_photos` (3) photos to check gets getInfo calls.
Otherwise page 1 of the listing is read (1 call; it tells the number of pages), and the next page
is read only while the pages left are fewer than the photos still undecided; the photos left
then get getInfo calls. Photos absent from the whole listing are confirmed with getInfo too (a
deletion during paging shifts photos to an earlier page, so absence alone is not proof). So a
user costs at most one call more than getInfo alone, and a user with many photos to check a few
pages instead of one call each. `FlickrClient.calls` counts the calls per method.

Calls go through `FlickrClient`: urllib3, JSON (`format=json&nojsoncallback=1`), the SSRF guard
of the fetch stage (`check_url`: the API host may be any public host given in `--flickr_api_url`;
a loopback host only exactly as given, for tests), retries with exponential backoff on HTTP 429
and 5xx (Retry-After honoured, capped), code 105 and connection errors, and a token bucket per
process whose rate is the process's share of the job-wide rate (`process_rate_share`).

`CheckConsent` is the Beam stage: elements carrying a `YfccRecord` are grouped by owner, checked,
and returned as `StageOutput(main=(element, ConsentResult), rejects=Rejected)`, one reject per
photo. `ConsentResult.metadata()` is what each sample records (check time, licence id and slug
seen): the rebuild puts it in the sample's Parquet row (`dataset.schema.CONSENT_COLUMNS`).
"""
from __future__ import annotations

import copy
import ipaddress
import json
import logging
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional
from urllib.parse import urlencode, urlsplit

import apache_beam as beam
import urllib3
from apache_beam.metrics import Metrics

from dataset.schema import CONSENT_COLUMNS
from transforms.rate_limit import process_rate_share
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, YfccRecord
from transforms.rejects import reject
from transforms.s3_fetch import (DEFAULT_PORTS, LOOPBACK_NAMES, DisallowedUrl, HostPolicy,
                                 ResolveError, Resolver, Target, TokenBucket, check_url,
                                 resolve_host)
from transforms.spill import SpilledGroupByKey, flatten_spilling_to
from transforms.stage import StageDoFn, StageOutput, record_of
from transforms.tags import clean_tag

STAGE = "consent"
DEFAULT_API_URL = "https://api.flickr.com/services/rest/"
# Flickr's published limit: 3,600 queries per hour per API key, for the whole job.
DEFAULT_REQUESTS_PER_SECOND = 1.0
PER_PAGE = 500  # getPublicPhotos' maximum
GET_INFO = "flickr.photos.getInfo"
GET_PUBLIC_PHOTOS = "flickr.people.getPublicPhotos"
GET_LICENSES = "flickr.photos.licenses.getInfo"
OK = ""
REASONS = ("not_found", "not_public", "no_cv_tag", "license_changed", "check_failed")
NOT_FOUND_CODE = 1  # getInfo: photo not found; getPublicPhotos: user not found
RETRY_CODES = frozenset({105})  # service currently unavailable
DEFAULT_OPT_OUT_TAGS = ("no_cv",)


class FlickrLicense(NamedTuple):
    """One of Flickr's licence ids: its name, slug, whether FDH may still use the photo, and the
    licence's URL (empty when Flickr gives none)."""

    name: str
    slug: str
    allowed: bool  # a CC licence or public-domain tool that permits derivatives
    url: str = ""


# Flickr's licence ids 0-10, verified against a recorded flickr.photos.licenses.getInfo answer
# (Flickr-Foundation/flickr-photos-api, tests/api/test_license_methods.py), which lists exactly
# these. Any other id is looked up at run time (`FlickrClient.licenses`) and classified by its
# URL (`license_from_info`). 7 and 8 are not CC licences, so not allowed.
_CC = "https://creativecommons.org/"
FLICKR_LICENSES: dict[int, FlickrLicense] = {
    0: FlickrLicense("All Rights Reserved", "all-rights-reserved", False),
    1: FlickrLicense("Attribution-NonCommercial-ShareAlike License", "cc-by-nc-sa-2", True,
                     f"{_CC}licenses/by-nc-sa/2.0/"),
    2: FlickrLicense("Attribution-NonCommercial License", "cc-by-nc-2", True,
                     f"{_CC}licenses/by-nc/2.0/"),
    3: FlickrLicense("Attribution-NonCommercial-NoDerivs License", "cc-by-nc-nd-2", False,
                     f"{_CC}licenses/by-nc-nd/2.0/"),
    4: FlickrLicense("Attribution License", "cc-by-2", True, f"{_CC}licenses/by/2.0/"),
    5: FlickrLicense("Attribution-ShareAlike License", "cc-by-sa-2", True,
                     f"{_CC}licenses/by-sa/2.0/"),
    6: FlickrLicense("Attribution-NoDerivs License", "cc-by-nd-2", False,
                     f"{_CC}licenses/by-nd/2.0/"),
    7: FlickrLicense("No known copyright restrictions", "no-known-restrictions", False,
                     "https://www.flickr.com/commons/usage/"),
    8: FlickrLicense("United States Government Work", "us-government-work", False,
                     "http://www.usa.gov/copyright.shtml"),
    9: FlickrLicense("Public Domain Dedication (CC0)", "cc0-1", True,
                     f"{_CC}publicdomain/zero/1.0/"),
    10: FlickrLicense("Public Domain Mark", "pdm-1", True, f"{_CC}publicdomain/mark/1.0/"),
}
ALLOWED_LICENSE_IDS = frozenset(key for key, licence in FLICKR_LICENSES.items() if licence.allowed)
_CC_LICENSE = re.compile(
    r"^https?://(?:www\.)?creativecommons\.org/licenses/([a-z-]+)/(\d+)(?:\.\d+)*/?$")
_CC_PUBLIC_DOMAIN = re.compile(
    r"^https?://(?:www\.)?creativecommons\.org/publicdomain/(zero|mark)/(\d+)(?:\.\d+)*/?$")


def license_from_info(license_id: int, name: str, url: str) -> FlickrLicense:
    """A licence of a flickr.photos.licenses.getInfo answer, classified by its URL: allowed iff
    it is a creativecommons.org/licenses/CODE/ URL whose CODE has no "nd", or CC's
    publicdomain/zero or publicdomain/mark tool. The slug follows the verified table's
    (cc-by-4, cc0-1, pdm-1); anything else is `flickr-license-ID`, not allowed."""
    url = (url or "").strip()
    licence = _CC_LICENSE.match(url)
    if licence:
        code, major = licence.groups()
        return FlickrLicense(name, f"cc-{code}-{major}", "nd" not in code.split("-"), url)
    public_domain = _CC_PUBLIC_DOMAIN.match(url)
    if public_domain:
        tool, major = public_domain.groups()
        return FlickrLicense(name, f"{'cc0' if tool == 'zero' else 'pdm'}-{major}", True, url)
    return FlickrLicense(name, f"flickr-license-{license_id}", False, url)


def licenses_from_answer(answer: Mapping[str, Any]) -> dict[int, FlickrLicense]:
    """{id: FlickrLicense} of a flickr.photos.licenses.getInfo answer (KeyError, TypeError or
    ValueError when it cannot be read)."""
    return {int(item["id"]): license_from_info(int(item["id"]), str(item.get("name", "")),
                                                str(item.get("url") or ""))
            for item in answer["licenses"]["license"]}


class ConsentResult(NamedTuple):
    """What Flickr says now about one photo: ok (`reason` empty) or why it must go."""

    photo_id: int
    reason: str  # OK, or one of REASONS
    detail: str
    license_id: Optional[int]  # the licence id Flickr reported, None when it did not answer
    checked_at: str  # UTC, ISO 8601 to the second
    method: str  # GET_INFO or GET_PUBLIC_PHOTOS
    license: Optional[str] = None  # the slug of that licence, None when unknown

    @property
    def ok(self) -> bool:
        return self.reason == OK

    def metadata(self) -> dict[str, Any]:
        """The fields a sample records about its consent check (`CONSENT_COLUMNS` of its
        Parquet row): when Flickr was asked and the licence it reported."""
        return dict(zip(CONSENT_COLUMNS, (self.checked_at, self.license_id, self.license)))


def utc_now() -> str:
    """The current UTC time as 'YYYY-MM-DDTHH:MM:SSZ'."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# The decision (pure)


def _verified_licenses() -> dict[int, FlickrLicense]:
    return dict(FLICKR_LICENSES)


@dataclass(frozen=True)
class ConsentRules:
    """Which licences are known (by id) and which tags (clean form) opt a photo out."""

    licenses: Mapping[int, FlickrLicense] = field(default_factory=_verified_licenses)
    opt_out_tags: frozenset[str] = frozenset(map(clean_tag, DEFAULT_OPT_OUT_TAGS))

    def knows(self, license_id: Optional[int]) -> bool:
        """Whether `license_id` is in the licence table (else the checker looks it up)."""
        return license_id in self.licenses

    def with_licenses(self, looked_up: Mapping[int, FlickrLicense]) -> "ConsentRules":
        """These rules with the looked-up licences added (the verified table wins on an id)."""
        return replace(self, licenses={**looked_up, **self.licenses})

    def decide(self, photo_id: int, license_id: Optional[int], clean_tags: Iterable[str],
               is_public: bool, checked_at: str, method: str) -> ConsentResult:
        """The result for a photo Flickr answered about. The licence is decided last, so a
        `license_changed` result for an unknown id means everything else allowed the photo
        (`ConsentChecker` relies on it to decide again once the id is looked up)."""
        licence = self.licenses.get(license_id) if license_id is not None else None

        def result(reason: str, detail: str = "") -> ConsentResult:
            return ConsentResult(photo_id, reason, detail, license_id, checked_at, method,
                                 licence.slug if licence else None)

        if not is_public:
            return result("not_public")
        tag = next((tag for tag in clean_tags if tag in self.opt_out_tags), None)
        if tag is not None:
            return result("no_cv_tag", tag)
        if licence is None:
            return result("license_changed", f"unknown id {license_id}")
        if not licence.allowed:
            return result("license_changed", license_detail(license_id, licence))
        return result(OK)

    def from_info(self, photo_id: int, answer: Mapping[str, Any], checked_at: str) -> ConsentResult:
        """Decide from a getInfo answer."""
        photo = answer["photo"]
        tags = [clean_tag(tag.get("raw") or tag.get("_content", ""))
                for tag in photo.get("tags", {}).get("tag", [])]
        is_public = int(photo.get("visibility", {}).get("ispublic", 0)) == 1
        return self.decide(photo_id, int(photo["license"]), tags, is_public, checked_at, GET_INFO)

    def from_listing(self, photo: Mapping[str, Any], checked_at: str) -> ConsentResult:
        """Decide from one photo of a getPublicPhotos page (`extras=license,tags`)."""
        tags = [clean_tag(tag) for tag in str(photo.get("tags", "")).split()]
        return self.decide(int(photo["id"]), int(photo["license"]), tags,
                           int(photo.get("ispublic", 1)) == 1, checked_at, GET_PUBLIC_PHOTOS)


def license_detail(license_id: Optional[int], licence: FlickrLicense) -> str:
    """A `license_changed` detail: the slug of a verified licence (recheck writes 'OLD -> NEW'
    in opt_out.txt), the slug and URL of a looked-up one."""
    if license_id in FLICKR_LICENSES:
        return licence.slug
    return f"{licence.slug} ({licence.url or 'no URL'})"


def failed(photo_id: int, reason: str, detail: str, checked_at: str, method: str) -> ConsentResult:
    """A result without an answer from Flickr (`not_found` or `check_failed`)."""
    return ConsentResult(photo_id, reason, detail[:200], None, checked_at, method)


# --------------------------------------------------------------------------------------------
# The REST client


class FlickrApiError(Exception):
    """Flickr answered `stat: fail` with a code that retrying does not cure."""

    def __init__(self, code: int, message: str):
        super().__init__(f"code {code}: {message}")
        self.code = code


class CheckFailed(Exception):
    """No usable answer from Flickr after the retries (or an answer that cannot be read)."""


@dataclass(frozen=True)
class ConsentConfig:
    """Where and how fast to ask Flickr (per process: `requests_per_second` is its share)."""

    api_url: str = DEFAULT_API_URL
    api_key: str = ""
    requests_per_second: Optional[float] = DEFAULT_REQUESTS_PER_SECOND
    retries: int = 5
    backoff_factor: float = 1.0  # sleep backoff_factor * 2**n (+ jitter) before retry n+1
    backoff_jitter: float = 0.5
    backoff_max: float = 60.0
    retry_after_max: float = 120.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_bytes: int = 16 * 1024 * 1024
    listing_min_photos: int = 3
    per_page: int = PER_PAGE
    user_agent: str = "fdh-beam/0.1 (Flickr Diverse Humans consent check)"


def api_host_policy(api_url: str) -> HostPolicy:
    """The fetch stage's host policy allowing exactly the API URL's host:port (loopback only
    when the URL names it); raises ValueError for a URL that is not http(s)://host[:port]/path."""
    try:
        parsed = urlsplit(api_url)
        port = parsed.port
    except ValueError as error:
        raise ValueError(f"bad --flickr_api_url {api_url!r}: {error}") from None
    host = (parsed.hostname or "").rstrip(".")
    if parsed.scheme not in DEFAULT_PORTS or not host or "@" in parsed.netloc \
            or parsed.query or parsed.fragment:
        raise ValueError(f"bad --flickr_api_url {api_url!r}: expected http(s)://host[:port]/path "
                         f"without user, query or fragment")
    key = frozenset({(host, port or DEFAULT_PORTS[parsed.scheme])})
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        loopback = host in LOOPBACK_NAMES
    else:
        if not loopback:
            raise ValueError(f"bad --flickr_api_url {api_url!r}: IP-literal hosts are not allowed "
                             f"(loopback only, for tests)")
    return HostPolicy(loopback=key) if loopback else HostPolicy(extra=key)


_BUCKETS: dict[float, TokenBucket] = {}
_BUCKETS_LOCK = threading.Lock()


def process_bucket(rate: float) -> TokenBucket:
    """The token bucket of this process for `rate` (shared by every DoFn instance and thread)."""
    with _BUCKETS_LOCK:
        return _BUCKETS.setdefault(rate, TokenBucket(rate))


class FlickrClient:
    """Call Flickr REST methods with retries and the rate cap; counts the calls per method."""

    def __init__(self, config: ConsentConfig, resolve: Resolver = resolve_host,
                 sleep: Callable[[float], None] = time.sleep,
                 bucket: Optional[TokenBucket] = None):
        if not config.api_key:
            raise ValueError("the consent check needs a Flickr API key (--flickr_api_key)")
        self.config = config
        self.policy = api_host_policy(config.api_url)
        self.calls: Counter = Counter()
        self._resolve = resolve
        self._sleep = sleep
        self._bucket = bucket or (process_bucket(config.requests_per_second)
                                  if config.requests_per_second else None)
        self._target: Optional[Target] = None
        self._licenses: Optional[dict[int, FlickrLicense]] = None
        self._licenses_error: Optional[FlickrApiError] = None
        self._timeout = urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout)
        self._pools = urllib3.PoolManager(num_pools=4, maxsize=4, headers={
            "User-Agent": config.user_agent, "Accept": "application/json"})

    def close(self) -> None:
        self._pools.clear()

    def licenses(self) -> dict[int, FlickrLicense]:
        """Flickr's licence list (flickr.photos.licenses.getInfo), asked once per client.

        An answer, or a lasting error (FlickrApiError; an unreadable answer is one, code -1), is
        kept for the client's life; a transient failure (CheckFailed) is not, so a later photo
        with an unknown id asks again."""
        if self._licenses is None and self._licenses_error is None:
            try:  # CheckFailed propagates: nothing cached
                self._licenses = licenses_from_answer(self.call(GET_LICENSES))
            except FlickrApiError as error:
                self._licenses_error = error
            except (KeyError, TypeError, ValueError) as error:
                self._licenses_error = FlickrApiError(
                    -1, f"unreadable answer ({type(error).__name__}: {error})")
        if self._licenses_error is not None:
            raise self._licenses_error
        return self._licenses

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """The JSON answer of `method`; raises FlickrApiError (a lasting `stat: fail`) or
        CheckFailed (still failing after `retries` retries)."""
        query = urlencode({"method": method, "api_key": self.config.api_key, "format": "json",
                           "nojsoncallback": 1, **params})
        attempt = _Attempt()
        for tries in range(self.config.retries + 1):
            if tries:
                self._sleep(self._backoff(tries, attempt.retry_after))
            if self._bucket is not None:
                self._bucket.acquire()
            self.calls[method] += 1
            attempt = self._attempt(query)
            if attempt.answer is not None:
                return attempt.answer
        raise CheckFailed(f"{method}: {attempt.problem} after {self.config.retries + 1} tries")

    def _attempt(self, query: str) -> "_Attempt":
        """One request: its answer, or the transient problem worth a retry."""
        try:
            status, retry_after, body = self._get(query)
        except (urllib3.exceptions.HTTPError, OSError) as error:  # the key never goes in a detail
            detail = str(error).replace(self.config.api_key, "<key>")
            return _Attempt(problem=f"{type(error).__name__}: {detail}"[:200])
        if status == 429 or 500 <= status < 600:
            return _Attempt(problem=f"HTTP {status}", retry_after=retry_after)
        if status != 200:
            raise CheckFailed(f"HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            return _Attempt(problem="answer is not JSON")
        if not isinstance(answer, dict):
            raise CheckFailed("answer is not a JSON object")
        if answer.get("stat") == "ok":
            return _Attempt(answer=answer)
        code, message = int(answer.get("code", -1)), str(answer.get("message", ""))[:160]
        if code in RETRY_CODES:
            return _Attempt(problem=f"code {code}: {message}")
        raise FlickrApiError(code, message)

    def _backoff(self, retry: int, retry_after: Optional[float]) -> float:
        """Seconds to wait before retry number `retry`: exponential with jitter, at least the
        server's Retry-After (capped)."""
        config = self.config
        wait = min(config.backoff_max, config.backoff_factor * 2 ** (retry - 1))
        wait += random.uniform(0, config.backoff_jitter)
        if retry_after is not None:
            wait = max(wait, min(retry_after, config.retry_after_max))
        return wait

    def _get(self, query: str) -> tuple[int, Optional[float], bytes]:
        """GET the API URL with `query` at the guarded address: (status, Retry-After, body)."""
        target = self._checked_target()
        pool = self._pools.connection_from_host(
            target.address, target.port, target.scheme,
            pool_kwargs={"server_hostname": target.host, "assert_hostname": target.host}
            if target.scheme == "https" else None)
        response = pool.urlopen("GET", f"{target.request_path}?{query}",
                                headers={"Host": target.host_header}, retries=False,
                                redirect=False, assert_same_host=False, preload_content=False,
                                timeout=self._timeout)
        try:
            body = response.read(self.config.max_bytes + 1)
        finally:
            response.release_conn()
        if len(body) > self.config.max_bytes:
            raise CheckFailed(f"answer larger than {self.config.max_bytes} bytes")
        return response.status, _retry_after_seconds(response.headers.get("Retry-After", "")), body

    def _checked_target(self) -> Target:
        if self._target is None:
            try:
                self._target = check_url(self.config.api_url, self.policy, self._resolve)
            except (DisallowedUrl, ResolveError) as error:
                raise CheckFailed(f"API URL refused: {error}") from None
        return self._target


class _Attempt(NamedTuple):
    """One request's outcome: the answer, or a problem worth a retry (and the Retry-After)."""

    answer: Optional[dict[str, Any]] = None
    problem: str = ""
    retry_after: Optional[float] = None


def _retry_after_seconds(value: str) -> Optional[float]:
    """A Retry-After header in seconds (None when absent or an HTTP date: the backoff decides)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Per user: the cheaper method


class ConsentChecker:
    """Decide each photo of a user with the fewest calls (the rule is in the module docstring)."""

    def __init__(self, client: FlickrClient, rules: ConsentRules = ConsentRules(),
                 clock: Callable[[], str] = utc_now):
        self.client = client
        self.rules = rules
        self._clock = clock

    def check_records(self, records: Iterable[YfccRecord]) -> dict[int, ConsentResult]:
        """A result per photo id of `records` of any owners (checked owner by owner)."""
        by_owner: dict[str, list[YfccRecord]] = {}
        for record in records:
            by_owner.setdefault(record.user_nsid, []).append(record)
        results: dict[int, ConsentResult] = {}
        for user_nsid, owned in by_owner.items():
            results.update(self.check_user(user_nsid, owned))
        return results

    def check_user(self, user_nsid: str, records: Iterable[YfccRecord]) -> dict[int, ConsentResult]:
        """A result per photo id of `records` (all of `user_nsid`); never raises for a photo."""
        pending = {record.photo_id: record for record in records}
        results: dict[int, ConsentResult] = {}
        if len(pending) >= self.client.config.listing_min_photos:
            results.update(self._from_listing(user_nsid, set(pending)))
        for photo_id in pending.keys() - results.keys():
            results[photo_id] = self._photo(photo_id)
        return {photo_id: self._resolved(result) for photo_id, result in results.items()}

    def check_photo(self, photo_id: int) -> ConsentResult:
        """One photo through getInfo."""
        return self._resolved(self._photo(photo_id))

    def _resolved(self, result: ConsentResult) -> ConsentResult:
        """`result`, decided again from Flickr's licence list when Flickr reported an id the
        table lacks (asked once per client): allowed by its URL -> ok; ND, not CC or absent from
        the list -> license_changed; the list unreadable or refused -> license_changed; the list
        failing transiently -> check_failed (never a keep)."""
        license_id = result.license_id
        if result.reason != "license_changed" or license_id is None or result.license is not None:
            return result  # not decided by an unknown licence id
        if not self.rules.knows(license_id):
            try:
                self.rules = self.rules.with_licenses(self.client.licenses())
            except CheckFailed as error:
                return result._replace(reason="check_failed",
                                       detail=f"licence id {license_id}: {error}"[:200])
            except FlickrApiError as error:
                return result._replace(
                    detail=f"unknown id {license_id} ({GET_LICENSES} {error})"[:200])
        licence = self.rules.licenses.get(license_id)
        if licence is None:
            return result._replace(detail=f"unknown id {license_id} (not in {GET_LICENSES})")
        if licence.allowed:
            return result._replace(reason=OK, detail="", license=licence.slug)
        return result._replace(detail=license_detail(license_id, licence), license=licence.slug)

    def _photo(self, photo_id: int) -> ConsentResult:
        """One photo through getInfo, decided with the licence table as it is."""
        try:
            answer = self.client.call(GET_INFO, photo_id=photo_id)
            return self.rules.from_info(photo_id, answer, self._clock())
        except FlickrApiError as error:
            reason = "not_found" if error.code == NOT_FOUND_CODE else "check_failed"
            return failed(photo_id, reason, f"{GET_INFO} {error}", self._clock(), GET_INFO)
        except CheckFailed as error:
            return failed(photo_id, "check_failed", str(error), self._clock(), GET_INFO)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            return failed(photo_id, "check_failed", f"{GET_INFO}: unreadable answer "
                          f"({type(error).__name__}: {error})", self._clock(), GET_INFO)

    def _from_listing(self, user_nsid: str, photo_ids: set[int]) -> dict[int, ConsentResult]:
        """Results for the photos found in the user's public listing, read while its pages
        left are fewer than the photos undecided; the others are left to getInfo."""
        decided: dict[int, ConsentResult] = {}
        page = 1
        while True:
            try:
                photos = self.client.call(GET_PUBLIC_PHOTOS, user_id=user_nsid,
                                          extras="license,tags", per_page=self.client.config.per_page,
                                          page=page)["photos"]
                for photo in photos.get("photo", []):
                    photo_id = int(photo["id"])
                    if photo_id in photo_ids and photo_id not in decided:
                        decided[photo_id] = self.rules.from_listing(photo, self._clock())
                pages = int(photos.get("pages", 0))
            except FlickrApiError as error:
                if error.code == NOT_FOUND_CODE:  # the account is gone, and every photo with it
                    return {photo_id: failed(photo_id, "not_found", f"{GET_PUBLIC_PHOTOS} {error}",
                                             self._clock(), GET_PUBLIC_PHOTOS)
                            for photo_id in photo_ids}
                return decided
            except CheckFailed as error:
                return {photo_id: decided.get(photo_id) or failed(
                    photo_id, "check_failed", str(error), self._clock(), GET_PUBLIC_PHOTOS)
                    for photo_id in photo_ids}
            except (KeyError, TypeError, ValueError, AttributeError):
                return decided  # an unreadable page: getInfo decides the rest
            undecided = len(photo_ids) - len(decided)
            if page >= pages or undecided == 0 or pages - page >= undecided:
                return decided
            page += 1


# --------------------------------------------------------------------------------------------
# Beam


class _KeyByOwnerFn(StageDoFn):
    """element -> (owner NSID, element); an element without a YfccRecord is a reject."""

    stage = STAGE

    def process_element(self, element: Any) -> Iterator[Any]:
        record = record_of(element)
        if record is None:
            yield reject(STAGE, "no_record", "unknown", f"{type(element).__name__} carries no "
                         f"YfccRecord")
            return
        yield record.user_nsid, element


class _CheckOwnerFn(StageDoFn):
    """(owner, elements) -> (element, ConsentResult) for the photos Flickr still allows, and one
    reject per photo that must go."""

    stage = STAGE

    def __init__(self, config: ConsentConfig, rules: ConsentRules):
        self._config = config
        self._rules = rules

    def setup(self) -> None:
        self._client = FlickrClient(self._config)
        self._checker = ConsentChecker(self._client, self._rules)

    def teardown(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def process_element(self, owner_elements: tuple[str, Iterable[Any]]) -> Iterator[Any]:
        user_nsid, elements = owner_elements
        elements = list(elements)
        records = {record.photo_id: record for record in map(record_of, elements)}
        calls_before = Counter(self._client.calls)
        try:
            results = self._checker.check_user(user_nsid, records.values())
        except Exception as error:  # a bug: every photo of the user is a failed check, not lost
            logging.exception("consent check of %s failed", user_nsid)
            now = utc_now()
            results = {photo_id: failed(photo_id, "check_failed", f"{type(error).__name__}: "
                                        f"{error}", now, "") for photo_id in records}
        for method, count in (self._client.calls - calls_before).items():
            Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.calls_{method}").inc(count)
        for photo_id, result in results.items():
            Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.{result.reason or 'ok'}").inc()
            if not result.ok:
                yield reject(STAGE, result.reason, str(photo_id), result.detail,
                             photo_id=photo_id, user_nsid=user_nsid)
        for element in elements:
            result = results[record_of(element).photo_id]
            if result.ok:
                yield element, result


class ConsentSubject(NamedTuple):
    """An element `CheckConsent` can key and check: a photo, its owner, and what it carries (an
    encoded sample in the rebuild, where only photos that yield a sample are checked)."""

    photo_id: int
    user_nsid: str
    payload: Any


class CheckConsent(beam.PTransform):
    """Elements carrying a YfccRecord -> StageOutput(main=(element, ConsentResult) for the photos
    their owners still allow, rejects=Rejected(stage='consent') one per photo that must go).

    `requests_per_second` is for the whole job: each of the `max_num_workers x
    processes_per_worker` processes gets its share. Bad settings (no API key, a bad URL) fail
    here, when the pipeline is built.
    """

    def __init__(self, api_url: str = DEFAULT_API_URL, api_key: str = "",
                 requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
                 max_num_workers: int = 1, processes_per_worker: int = 1,
                 rules: ConsentRules = ConsentRules(), **config_overrides: Any):
        super().__init__()
        share = process_rate_share(requests_per_second, max_num_workers, processes_per_worker)
        self._config = ConsentConfig(api_url=api_url, api_key=api_key,
                                     requests_per_second=share, **config_overrides)
        self._rules = rules
        self._staging_dir: Optional[str] = None
        FlickrClient(self._config).close()  # validates the key and the URL now

    @property
    def config(self) -> ConsentConfig:
        return self._config

    def spilling_to(self, staging_dir: Optional[str]) -> "CheckConsent":
        """This check with the grouping by owner spilled to `staging_dir` (local runs: the
        elements, encoded samples in the rebuild, wait in files; `transforms.spill`), and its
        rejects as `SpilledBatch` references to files there (`LoadSpilled` gives them back)."""
        spilled = copy.copy(self)
        spilled._staging_dir = staging_dir
        return spilled

    def expand(self, elements: beam.PCollection) -> StageOutput:
        keyed = elements | "KeyByOwner" >> beam.ParDo(_KeyByOwnerFn()).with_outputs(
            REJECTS_TAG, main="main")
        checked = (keyed.main
                   | "GroupByOwner" >> SpilledGroupByKey(self._staging_dir)
                   | "Check" >> beam.ParDo(_CheckOwnerFn(self._config, self._rules))
                   .with_outputs(REJECTS_TAG, main="main"))
        rejects = ((keyed[REJECTS_TAG], checked[REJECTS_TAG])
                   | "MergeRejects" >> flatten_spilling_to(self._staging_dir))
        return StageOutput(checked.main, rejects)


# --------------------------------------------------------------------------------------------
# Flags shared by the jobs that check consent (rebuild --consent_check=api, recheck)

CONSENT_CHECK_MODES = ("off", "api")


def add_consent_arguments(parser: Any, mode_help: Optional[str] = None, key_required: bool = False,
                          rate_flag: str = "--flickr_requests_per_second") -> None:
    """Add the consent check's flags to an argparse parser (a job's `_add_argparse_args`):
    --consent_check (only with `mode_help`, default off), --flickr_api_key, --flickr_api_url and
    the job-wide API rate under `rate_flag` (rebuild's --flickr_requests_per_second is its image
    fetch rate, so it names this one differently)."""
    if mode_help is not None:
        parser.add_argument("--consent_check", choices=CONSENT_CHECK_MODES, default="off",
                            help=mode_help)
    parser.add_argument("--flickr_api_key", default="", required=key_required,
                        help="Flickr API key for the consent check (never written to an output)")
    parser.add_argument("--flickr_api_url", default=DEFAULT_API_URL,
                        help="Flickr REST endpoint; a loopback URL is allowed exactly as given "
                             "(tests)")
    parser.add_argument(rate_flag, type=float, default=DEFAULT_REQUESTS_PER_SECOND,
                        help="Flickr API calls per second for the WHOLE job, split over its "
                             "processes (Flickr's documented limit is 3,600 per hour per key)")


def consent_from_flags(consent_check: str, flickr_api_key: str = "",
                       flickr_api_url: str = DEFAULT_API_URL,
                       flickr_requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
                       max_num_workers: int = 1, processes_per_worker: int = 1
                       ) -> Optional[CheckConsent]:
    """The CheckConsent stage the flags ask for (None for 'off'); ValueError for bad flags
    (an unknown mode, 'api' without a key, a bad URL or rate), to report at launch."""
    if consent_check not in CONSENT_CHECK_MODES:
        raise ValueError(f"--consent_check must be one of {', '.join(CONSENT_CHECK_MODES)}, "
                         f"got {consent_check!r}")
    if consent_check == "off":
        return None
    return CheckConsent(flickr_api_url, flickr_api_key, flickr_requests_per_second,
                        max_num_workers, processes_per_worker)
