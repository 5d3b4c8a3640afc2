"""Stage 3, fetch: source specs, the SSRF guard, the HTTP client against a real loopback server
(every fault endpoint of tests/http_fixture.py), file sources, caps, and a Beam pipeline
FetchImages | DecodeImages where records in = decoded + rejects."""
from __future__ import annotations

import concurrent.futures
import io
import os
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline, read_counters
from tests.factories import make_record
from PIL import Image

from tests.http_fixture import OVERSIZE_BYTES, mirror_path, sample_jpegs
from transforms.s3_fetch import (DisallowedUrl, FetchConfig, FetchImages, HostPolicy, ImageFetcher,
                                 ImageSource, TokenBucket, check_url, parse_image_sources,
                                 robots_refusal)
from transforms.mirror_layout import BadMirrorHash, mirror_path as layout_path, mirror_relative_path
from transforms.yfcc_format import photo_hash
from transforms.image_checks import quick_check
from transforms.s4_decode import DecodeError, DecodeImages, decode_image

PUBLIC_IP = "93.184.216.34"
# Small timeouts and near-zero backoff: faults resolve in well under a second each.
FAST = FetchConfig(threads=8, connect_timeout=2.0, read_timeout=0.5, total_timeout=5.0, retries=2,
                   backoff_factor=0.01, backoff_jitter=0.0, retry_after_max=2.0)


def public_resolver(host: str, port: int) -> list[str]:
    """Pretend every allowed name resolves to a public address (no DNS on this machine)."""
    return [PUBLIC_IP]


def fault_record(server, fault: str, photo_id: int = 7):
    return make_record(photo_id, download_url=server.url(f"/fault/{fault}"))


def loopback_fetcher(server, spec_tail: str = "flickr", **config) -> ImageFetcher:
    """Mirror on the loopback server first, then the record's download URL (pointing at it too)."""
    sources = parse_image_sources(f"mirror:{server.base_url},{spec_tail}")
    return ImageFetcher(sources, FetchConfig(**{**FAST.__dict__, **config}))


# --- spec parsing -------------------------------------------------------------------------------

def test_parse_image_sources_valid_specs():
    sources = parse_image_sources(
        "mirror:https://multimedia-commons.s3-us-west-2.amazonaws.com/, flickr ,flickr:z,mirror:/data/yfcc")
    assert [s.kind for s in sources] == ["mirror", "flickr", "flickr", "mirror"]
    assert sources[0].prefix == "https://multimedia-commons.s3-us-west-2.amazonaws.com"
    assert sources[0].is_http and sources[1].is_http and not sources[3].is_http
    assert sources[2].suffix == "z"


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("mirror:", "no prefix"),
    ("s3cache:/x", "unknown image source"),
    ("flickr:huge", "size suffix"),
    ("mirror:http://10.0.0.5/yfcc", "IP-literal"),
    ("mirror:http://user@host.example/yfcc", "bad mirror URL"),
    ("mirror:http://host.example:99999/", "bad port"),
    ("mirror:nosuchfs://bucket/yfcc", "no Beam filesystem"),
])
def test_parse_image_sources_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_image_sources(spec)


def test_source_locations_follow_mirror_layout_and_flickr_sizes(tmp_path):
    record = make_record(42, server_id="7372", secret="s3cr3t")
    h = record.photo_hash
    mirror, local, flickr, flickr_z = parse_image_sources(
        f"mirror:https://multimedia-commons.s3-us-west-2.amazonaws.com,mirror:{tmp_path},flickr,flickr:z")
    assert mirror.location(record) == (
        f"https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images/{h[:3]}/{h[3:6]}/{h}.jpg")
    assert local.location(record) == str(tmp_path / "data" / "images" / h[:3] / h[3:6] / f"{h}.jpg")
    assert flickr.location(record) == record.download_url
    assert flickr_z.location(record) == "https://live.staticflickr.com/7372/42_s3cr3t_z.jpg"
    assert mirror.location(make_record(43, photo_hash="")) is None


# --- SSRF guard ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://farm3.staticflickr.com/2/1_a.jpg",
    "https://live.staticflickr.com/65535/1_a_z.jpg",
    "http://farm4.static.flickr.com/3/1_a.jpg",
    "https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images/abc/def/abcdef.jpg",
])
def test_check_url_allows_flickr_and_mirror_hosts(url):
    target = check_url(url, HostPolicy(), public_resolver)
    assert target.address == PUBLIC_IP and target.request_path.startswith("/")


@pytest.mark.parametrize("url, message", [
    ("http://169.254.169.254/latest/meta-data/", "IP-literal"),
    ("http://10.0.0.1/x.jpg", "IP-literal"),
    ("http://127.0.0.1/x.jpg", "IP-literal"),
    ("http://[::1]/x.jpg", "IP-literal"),
    ("http://[fd00::1]/x.jpg", "IP-literal"),
    ("http://[::ffff:169.254.169.254]/x.jpg", "IP-literal"),
    ("http://2130706433/x.jpg", "IP-literal"),
    ("http://0x7f000001/x.jpg", "IP-literal"),
    ("http://localhost/x.jpg", "not allowed"),
    ("http://localhost.localdomain/x.jpg", "not allowed"),
    ("http://metadata.google.internal/computeMetadata/v1/", "not allowed"),
    ("http://farm3.staticflickr.com.evil.example/x.jpg", "not allowed"),
    ("http://farm3.staticflickr.com:8080/x.jpg", "not allowed"),
    ("http://user:pw@farm3.staticflickr.com/x.jpg", "user info"),
    ("ftp://farm3.staticflickr.com/x.jpg", "scheme"),
    ("file:///etc/passwd", "scheme"),
])
def test_check_url_rejects_disallowed_urls(url, message):
    def must_not_resolve(host, port):
        raise AssertionError(f"resolved {host}")

    with pytest.raises(DisallowedUrl, match=message):
        check_url(url, HostPolicy(), must_not_resolve)


@pytest.mark.parametrize("address", ["10.1.2.3", "169.254.169.254", "127.0.0.1", "192.168.1.1",
                                     "100.64.0.1", "::1", "fe80::1", "::ffff:10.0.0.1", "224.0.0.1",
                                     "0.0.0.0"])
def test_check_url_rejects_allowed_names_resolving_to_private_addresses(address):
    with pytest.raises(DisallowedUrl, match="non-public"):
        check_url("http://live.staticflickr.com/1/2_3.jpg", HostPolicy(), lambda h, p: [PUBLIC_IP, address])


def test_check_url_loopback_prefix_allows_only_its_exact_host_and_port():
    policy = HostPolicy.for_sources(parse_image_sources("mirror:http://127.0.0.1:8123"))
    target = check_url("http://127.0.0.1:8123/data/images/a.jpg", policy)
    assert (target.address, target.host_header) == ("127.0.0.1", "127.0.0.1:8123")
    with pytest.raises(DisallowedUrl):
        check_url("http://127.0.0.1:8124/data/images/a.jpg", policy)
    with pytest.raises(DisallowedUrl):
        check_url("http://localhost:8123/data/images/a.jpg", policy)


def test_check_url_configured_prefix_host_is_allowed_but_must_resolve_public():
    policy = HostPolicy.for_sources(parse_image_sources("mirror:https://yfcc.example.org/mirror"))
    assert check_url("https://yfcc.example.org/mirror/x.jpg", policy, public_resolver).port == 443
    with pytest.raises(DisallowedUrl, match="non-public"):
        check_url("https://yfcc.example.org/mirror/x.jpg", policy, lambda h, p: ["10.0.0.8"])


# --- HTTP client against the loopback server ----------------------------------------------------

def test_fetch_from_mirror(http_server):
    record = make_record(1)
    path = http_server.add_mirror_image(record.photo_hash, sample_jpegs()["coffee"])
    outcome = loopback_fetcher(http_server).fetch(record)
    assert outcome.image is not None and outcome.image.source == "mirror"
    assert outcome.image.data == sample_jpegs()["coffee"]
    assert outcome.image.url == http_server.url(path) and outcome.bytes_read == len(outcome.image.data)
    assert http_server.requests_to(path) == 1


def test_mirror_photos_stored_as_png_or_gif_are_found(http_server):
    """The mirror keeps a few photos as .png/.gif: a .jpg miss tries those before giving up."""
    record = make_record(2)
    png = io.BytesIO()
    Image.open(io.BytesIO(sample_jpegs()["chelsea"])).save(png, format="PNG")
    jpg_path = mirror_path(record.photo_hash)
    png_path = http_server.add_file(jpg_path[:-len("jpg")] + "png", png.getvalue(), "image/png")
    outcome = loopback_fetcher(http_server).fetch(record)
    assert outcome.image is not None and outcome.image.url == http_server.url(png_path)
    assert http_server.requests_to(jpg_path) == 1 and http_server.requests_to(png_path) == 1
    assert outcome.attempts == []
    missing_record = make_record(3, download_url="")
    missing = loopback_fetcher(http_server).fetch(missing_record)
    assert missing.reason == "not_found"
    assert http_server.requests_to(mirror_path(missing_record.photo_hash)[:-3] + "gif") == 1


def _flat_jpeg() -> bytes:
    flat = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(flat, format="JPEG")
    return flat.getvalue()


def test_garbage_on_the_mirror_falls_back_to_flickr(http_server):
    record = make_record(8, download_url=http_server.url("/flickr/8_x.jpg"))
    http_server.add_mirror_image(record.photo_hash, _flat_jpeg())
    http_server.add_file("/flickr/8_x.jpg", sample_jpegs()["astronaut"])
    outcome = loopback_fetcher(http_server).fetch(record)
    assert outcome.image.source == "flickr" and outcome.image.data == sample_jpegs()["astronaut"]
    assert [(a.source, a.reason) for a in outcome.attempts] == [("mirror", "bad_image")]
    assert outcome.attempts[0].detail.startswith("near_blank")


def test_garbage_is_kept_for_decode_when_no_source_has_better(http_server):
    record = make_record(9, download_url=http_server.url("/flickr/gone.jpg"))
    http_server.add_mirror_image(record.photo_hash, _flat_jpeg())
    outcome = loopback_fetcher(http_server).fetch(record)
    assert outcome.image.source == "mirror" and outcome.image.data == _flat_jpeg()
    assert [(a.source, a.reason) for a in outcome.attempts] == [("mirror", "bad_image"),
                                                                 ("flickr", "not_found")]
    with pytest.raises(DecodeError, match="near_blank"):
        decode_image(outcome.image.data)
    unchecked = loopback_fetcher(http_server, check_before_fallback=False).fetch(record)
    assert unchecked.image.source == "mirror" and unchecked.attempts == []


def test_quick_check_agrees_with_decode_on_real_photos_and_garbage():
    for name, data in sample_jpegs().items():
        assert quick_check(data) is None, name
    assert quick_check(_flat_jpeg()).reason == "near_blank"
    assert quick_check(b"").reason == "empty"
    assert quick_check(b"<html>").reason == "html"
    assert quick_check(sample_jpegs()["coffee"][:3000]).reason == "truncated"


def test_fetch_falls_back_to_flickr_when_mirror_misses(http_server):
    http_server.add_file("/flickr/5_x.jpg", sample_jpegs()["chelsea"])
    record = make_record(5, download_url=http_server.url("/flickr/5_x.jpg"))
    outcome = loopback_fetcher(http_server).fetch(record)
    assert outcome.image.source == "flickr" and outcome.image.data == sample_jpegs()["chelsea"]
    assert [(a.source, a.reason) for a in outcome.attempts] == [("mirror", "not_found")]


def test_fetch_not_found_everywhere(http_server):
    outcome = loopback_fetcher(http_server).fetch(make_record(6, download_url=http_server.url("/gone.jpg")))
    assert outcome.image is None and outcome.reason == "not_found"
    assert "mirror not_found" in outcome.detail and "flickr not_found" in outcome.detail


def test_fetch_retries_500_then_succeeds(http_server):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, "flaky-500"))
    assert outcome.image is not None and outcome.image.data == sample_jpegs()["astronaut"]
    assert http_server.requests_to("/fault/flaky-500") == 3


def test_fetch_honours_retry_after(http_server):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, "429"))
    assert outcome.image is not None
    first, second = [e for e in http_server.log if e.path == "/fault/429"]
    assert first.status == 429 and second.status == 200
    assert second.start - first.end >= 0.9  # waited the server's Retry-After: 1


def test_fetch_caps_retry_after(http_server):
    outcome = loopback_fetcher(http_server, retry_after_max=0.2).fetch(fault_record(http_server, "429-long"))
    assert outcome.image is not None  # did not sleep 3600 s
    first, second = [e for e in http_server.log if e.path == "/fault/429-long"]
    assert second.start - first.end < 60


def test_fetch_retries_exhausted_on_persistent_503(http_server):
    outcome = loopback_fetcher(http_server, retries=2).fetch(fault_record(http_server, "always-503"))
    assert outcome.reason == "retries_exhausted" and "HTTP 503" in outcome.detail
    assert http_server.requests_to("/fault/always-503") == 3


@pytest.mark.parametrize("fault, reason, in_detail", [
    ("slow", "timeout", ""),
    ("truncated", "connection_error", "body"),
    ("reset", "connection_error", ""),
])
def test_fetch_failures_are_retried_once_then_rejected(http_server, fault, reason, in_detail):
    outcome = loopback_fetcher(http_server, retries=1).fetch(fault_record(http_server, fault))
    assert outcome.reason == reason and in_detail in outcome.detail
    assert http_server.requests_to(f"/fault/{fault}") == 2


def test_fetch_detects_flickr_placeholder_by_redirect(http_server):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, "placeholder"))
    assert outcome.reason == "unavailable" and "photo_unavailable" in outcome.detail
    assert http_server.requests_to("/photo_unavailable.gif") == 0


@pytest.mark.parametrize("fault", ["redirect-metadata", "redirect-localhost"])
def test_fetch_rejects_disallowed_redirect(http_server, fault):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, fault))
    assert outcome.reason == "disallowed_redirect"
    assert http_server.requests_to("/fault/html") == 0  # the localhost hop was never requested


def test_fetch_follows_allowed_redirect(http_server):
    path = http_server.add_mirror_image("f" * 32, sample_jpegs()["coffee"])
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, "redirect-ok"))
    assert outcome.image is not None and outcome.image.url == http_server.url(path)
    assert outcome.image.data == sample_jpegs()["coffee"]


def test_fetch_rejects_disallowed_url_without_requesting(http_server):
    record = make_record(9, download_url="http://169.254.169.254/latest/meta-data/iam")
    outcome = ImageFetcher(parse_image_sources("flickr"), FAST).fetch(record)
    assert outcome.reason == "disallowed_url"


@pytest.mark.parametrize("fault", ["oversize", "oversize-stream"])
def test_fetch_byte_cap(http_server, fault):
    outcome = loopback_fetcher(http_server, max_bytes=OVERSIZE_BYTES // 3).fetch(
        fault_record(http_server, fault))
    assert outcome.reason == "too_large"


@pytest.mark.parametrize("fault", ["html", "html-as-jpeg"])
def test_fetch_rejects_html(http_server, fault):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, fault))
    assert outcome.reason == "html"


def test_per_host_concurrency_cap(http_server):
    http_server.delay_seconds = 0.3
    records = [make_record(100 + i) for i in range(8)]
    for record in records:
        http_server.add_mirror_image(record.photo_hash, sample_jpegs()["chelsea"])
    fetcher = loopback_fetcher(http_server, threads=8, per_host_concurrency=2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(fetcher.fetch, records))
    assert all(o.image is not None for o in outcomes)
    assert http_server.max_in_flight == 2


def test_token_bucket_spaces_requests():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=10, burst=1, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.acquire()
    assert slept == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert now[0] == pytest.approx(0.4)


def test_flickr_hosts_get_the_polite_caps_and_the_mirror_does_not():
    fetcher = ImageFetcher(parse_image_sources("mirror:https://multimedia-commons.s3-us-west-2.amazonaws.com,flickr"),
                           FetchConfig(per_host_concurrency=16, flickr_concurrency=3,
                                       flickr_requests_per_second=2.0))
    flickr_semaphore, flickr_buckets = fetcher.host_limits("farm4.staticflickr.com", 80)
    live_semaphore, _ = fetcher.host_limits("live.staticflickr.com", 443)
    mirror_semaphore, mirror_buckets = fetcher.host_limits(
        "multimedia-commons.s3-us-west-2.amazonaws.com", 443)
    assert [bucket.rate for bucket in flickr_buckets] == [2.0] and mirror_buckets == []
    for _ in range(3):
        assert flickr_semaphore.acquire(blocking=False)
    assert not flickr_semaphore.acquire(blocking=False)  # the 4th concurrent Flickr request waits
    assert live_semaphore is not flickr_semaphore  # caps are per host
    for _ in range(16):
        assert mirror_semaphore.acquire(blocking=False)
    assert not mirror_semaphore.acquire(blocking=False)


# --- file sources through Beam FileSystems ------------------------------------------------------

def test_fetch_from_local_mirror_dir(tmp_path):
    present, missing, big = make_record(11), make_record(12), make_record(13)
    for record, data in ((present, sample_jpegs()["coffee"]), (big, bytes(5000))):
        h = record.photo_hash
        path = tmp_path / "data" / "images" / h[:3] / h[3:6] / f"{h}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    sources = parse_image_sources(f"mirror:{tmp_path}")
    outcome = ImageFetcher(sources).fetch(present)
    assert outcome.image.data == sample_jpegs()["coffee"] and outcome.image.source == "mirror"
    capped = ImageFetcher(sources, FetchConfig(max_bytes=4000))
    assert capped.fetch(missing).reason == "not_found"
    assert capped.fetch(big).reason == "too_large"


# --- Beam: FetchImages | DecodeImages -----------------------------------------------------------

def test_fetch_decode_pipeline_accounts_for_every_record(http_server):
    good = [make_record(200 + i) for i in range(3)]
    for record, name in zip(good, ("astronaut", "coffee", "chelsea")):
        http_server.add_mirror_image(record.photo_hash, sample_jpegs()[name])
    cut_short = make_record(210)
    http_server.add_mirror_image(cut_short.photo_hash, sample_jpegs()["coffee"][:5000])
    faults = {"placeholder": "unavailable", "redirect-metadata": "disallowed_redirect", "html": "html"}
    fault_records = [fault_record(http_server, f, 300 + i) for i, f in enumerate(faults)]
    missing = make_record(400, download_url=http_server.url("/nope.jpg"))
    records = good + [cut_short, missing] + fault_records
    expected_rejects = sorted(
        [(str(r.photo_id), "fetch", reason) for r, reason in zip(fault_records, faults.values())]
        + [("400", "fetch", "not_found"), ("210", "decode", "truncated")])

    with make_pipeline(PipelineOptions([])) as pipeline:
        fetched = (pipeline | beam.Create(records)
                   | "Fetch" >> FetchImages(f"mirror:{http_server.base_url},flickr", FAST))
        decoded = fetched.main | "Decode" >> DecodeImages()
        rejects = (fetched.rejects, decoded.rejects) | beam.Flatten()
        assert_that(decoded.main | beam.Map(lambda d: (d.record.photo_id, d.image.shape[2], len(d.sha256))),
                    equal_to([(r.photo_id, 3, 64) for r in good]), label="Decoded")
        assert_that(rejects | beam.Map(lambda r: (r.record_id, r.stage, r.reason)),
                    equal_to(expected_rejects), label="Rejects")
    counters = read_counters(pipeline.result)
    assert counters["fetch.ok"] == 4 and counters["decode.ok"] == 3
    assert counters["fetch.bytes"] == sum(len(sample_jpegs()[n]) for n in ("astronaut", "coffee", "chelsea")) + 5000
    assert counters["fetch.unavailable"] == 1 and counters["decode.truncated"] == 1


def test_fetch_images_rejects_bad_spec_at_construction():
    with pytest.raises(ValueError, match="unknown image source"):
        FetchImages("s3:bucket")
    with pytest.raises(ValueError):
        FetchImages([ImageSource("flickr")], threads=0)


# --- issue 10: mirror hash and paths (finding 4) ----------------------------------------------


def test_traversal_hash_never_reads_outside_a_local_mirror(tmp_path):
    prefix = tmp_path / "m1" / "m2" / "m3" / "m4"
    prefix.mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(sample_jpegs()["coffee"])
    evil = "../../../../secret"
    # The layout as written before the guard would have led straight to the secret:
    unguarded = prefix / "data" / "images" / evil[:3] / evil[3:6] / f"{evil}.jpg"
    assert os.path.normpath(unguarded) == str(secret)
    fetcher = ImageFetcher(parse_image_sources(f"mirror:{prefix}"), FAST)
    outcome = fetcher.fetch(make_record(11, photo_hash=evil, download_url=""))
    assert outcome.image is None and outcome.reason == "bad_hash"
    assert evil in outcome.detail and outcome.bytes_read == 0


@pytest.mark.parametrize("bad", ["../../../../secret", "A12BEEA83CA8CEC88404EA025958A5B",
                                 "/etc/passwd", "a12bee/../../x", "a12beea83ca8cec88404ea025958a5b0ff"])
def test_malformed_hash_is_recomputed_from_the_download_url(tmp_path, bad):
    record = make_record(12, photo_hash=bad)
    good = photo_hash(record.download_url)
    target = tmp_path / "data" / "images" / good[:3] / good[3:6] / f"{good}.jpg"
    target.parent.mkdir(parents=True)
    target.write_bytes(sample_jpegs()["chelsea"])
    outcome = ImageFetcher(parse_image_sources(f"mirror:{tmp_path}"), FAST).fetch(record)
    assert outcome.image is not None and outcome.image.url == str(target)


@pytest.mark.parametrize("good", ["a12beea83ca8cec88404ea025958a5b", "0" * 16, "f" * 32])
def test_mirror_layout_accepts_yfcc_hashes_and_refuses_others(good):
    assert mirror_relative_path(good) == f"data/images/{good[:3]}/{good[3:6]}/{good}.jpg"
    assert layout_path("gs://b/yfcc/", good, "png") == f"gs://b/yfcc/data/images/{good[:3]}/{good[3:6]}/{good}.png"
    for bad in ("", "0" * 15, "0" * 33, good.upper() + "A", "../" + good, good[:-1] + "/"):
        with pytest.raises(BadMirrorHash):
            mirror_relative_path(bad)


# --- issue 10: every reject names what was tried (finding 10) ---------------------------------


def test_not_found_detail_names_every_path_and_url_tried(tmp_path, http_server):
    missing = tmp_path / "no-such-mirror"
    sources = parse_image_sources(f"mirror:{missing},mirror:{http_server.base_url},flickr")
    record = make_record(13, download_url=http_server.url("/gone/13.jpg"))
    outcome = ImageFetcher(sources, FAST).fetch(record)
    assert outcome.reason == "not_found"
    for extension in ("jpg", "png", "gif"):
        assert layout_path(str(missing), record.photo_hash, extension) in outcome.detail
        assert layout_path(http_server.base_url, record.photo_hash, extension) in outcome.detail
    assert http_server.url("/gone/13.jpg") in outcome.detail


def test_http_failure_detail_names_the_url(http_server):
    outcome = loopback_fetcher(http_server, retries=0).fetch(fault_record(http_server, "always-503"))
    assert outcome.reason == "retries_exhausted"
    assert http_server.url("/fault/always-503") in outcome.detail


# --- issue 10: the total deadline is wall clock, headers and body (finding 6) ------------------


@pytest.mark.parametrize("fault", ["drip-body", "drip-body-close", "drip-headers"])
def test_dripping_server_ends_at_the_total_deadline(http_server, fault):
    fetcher = loopback_fetcher(http_server, read_timeout=5.0, total_timeout=2.0, retries=1)
    start = time.monotonic()
    outcome = fetcher.fetch(fault_record(http_server, fault))
    elapsed = time.monotonic() - start
    assert outcome.image is None and outcome.reason == "timeout", outcome.detail
    assert 1.5 < elapsed < 4.0, elapsed


def test_deadline_watchdog_leaves_fast_answers_alone(http_server):
    fetcher = loopback_fetcher(http_server, total_timeout=1.0)
    record = make_record(14)
    http_server.add_mirror_image(record.photo_hash, sample_jpegs()["coffee"])
    for _ in range(3):
        assert fetcher.fetch(record).image is not None
    time.sleep(1.2)  # past every armed deadline: the kept-alive connection still works
    assert fetcher.fetch(record).image is not None


# --- issue 10: consent signals (X-Robots-Tag) -------------------------------------------------


@pytest.mark.parametrize("fault,refused", [("robots-noai", True), ("robots-ours", True),
                                           ("robots-other", False)])
def test_x_robots_tag_directives_are_honoured(http_server, fault, refused):
    outcome = loopback_fetcher(http_server).fetch(fault_record(http_server, fault))
    if refused:
        assert outcome.image is None and outcome.reason == "x_robots_tag"
        assert http_server.url(f"/fault/{fault}") in outcome.detail
    else:
        assert outcome.image is not None


def test_x_robots_tag_directive_list_is_configurable(http_server):
    lenient = loopback_fetcher(http_server, x_robots_tag_directives=())
    assert lenient.fetch(fault_record(http_server, "robots-noai")).image is not None
    strict = loopback_fetcher(http_server, x_robots_tag_directives=("noindex",))
    assert strict.fetch(fault_record(http_server, "robots-other")).image is not None
    assert strict.fetch(fault_record(http_server, "robots-noai")).image is not None
    transform = FetchImages("flickr", x_robots_tag_directives=("noai",))
    assert transform._config.x_robots_tag_directives == ("noai",)


@pytest.mark.parametrize("values,expected", [
    (["noai"], "noai"), (["NoImageAI"], "noimageai"), (["noarchive, noindex"], "noindex"),
    (["googlebot: noai"], None), (["*: noai"], "noai"), (["fdh-beam: noimageai, nofollow"], "noimageai"),
    (["unavailable_after: 25 Jun 2030 15:00:00 PST"], None), (["nofollow", "noai"], "noai"), ([], None)])
def test_robots_refusal_parses_header_values(values, expected):
    assert robots_refusal(values, ("noai", "noimageai", "noindex")) == expected
