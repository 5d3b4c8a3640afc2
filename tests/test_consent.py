"""The consent check against a loopback fake of the Flickr API: decisions, both methods, retries,
the calls it costs, and CheckConsent in a real Beam pipeline."""
from __future__ import annotations

import argparse

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline
from tests.factories import make_record
from tests.flickr_api_fixture import (API_KEY, CC_BY_4, CC_BY_NC_SA_4, CC_BY_ND_4, DELETED,
                                      MADE_PRIVATE, MANY_FIRST_ID, MANY_USER, RELICENSED_ND,
                                      TAGGED_NO_CV, UNCHANGED, UNLISTED_LICENSE, FakePhoto, World,
                                      flickr_api, mixed_world,
                                      serve)  # noqa: F401 (fixture)
from dataset.schema import CONSENT_COLUMNS
from transforms.consent import (ALLOWED_LICENSE_IDS, FLICKR_LICENSES, GET_INFO, GET_LICENSES,
                                GET_PUBLIC_PHOTOS, CheckConsent, ConsentChecker, ConsentConfig,
                                ConsentResult, ConsentRules, FlickrClient, add_consent_arguments,
                                api_host_policy, consent_from_flags, license_from_info)
from transforms.rate_limit import process_rate_share

FATES = {UNCHANGED: "", TAGGED_NO_CV: "no_cv_tag", RELICENSED_ND: "license_changed",
         DELETED: "not_found", MADE_PRIVATE: "not_found"}
OWNERS = {UNCHANGED: "1@N01", TAGGED_NO_CV: "2@N01", RELICENSED_ND: "3@N01", DELETED: "4@N01",
          MADE_PRIVATE: "5@N01"}
FAST = dict(requests_per_second=None, backoff_factor=0.0, backoff_jitter=0.0)


def _client(url: str, sleeps: list | None = None, **overrides) -> FlickrClient:
    config = ConsentConfig(api_url=url, api_key=API_KEY, **{**FAST, **overrides})
    return FlickrClient(config, sleep=(sleeps.append if sleeps is not None else lambda _: None))


def _checker(url: str, sleeps: list | None = None, **overrides) -> ConsentChecker:
    return ConsentChecker(_client(url, sleeps, **overrides), clock=lambda: "2026-12-01T00:00:00Z")


def _record(photo_id: int, owner: str | None = None):
    return make_record(photo_id, user_nsid=owner or OWNERS.get(photo_id, MANY_USER))


def _decisions(results: dict[int, ConsentResult]) -> dict[int, tuple]:
    return {photo_id: (r.reason, r.license_id) for photo_id, r in results.items()}


# -- the pure parts ------------------------------------------------------------------------------


def test_licence_table_holds_the_verified_ids_0_to_10_and_allows_only_cc_with_derivatives():
    assert sorted(FLICKR_LICENSES) == list(range(11))
    assert ALLOWED_LICENSE_IDS == {1, 2, 4, 5, 9, 10}
    assert all("NoDerivs" in FLICKR_LICENSES[i].name for i in (3, 6))


def test_the_url_rule_agrees_with_the_verified_table():
    """The rule that classifies looked-up licences gives each verified licence its slug and
    verdict (0, 7 and 8 have no CC URL: not allowed, slug flickr-license-ID)."""
    for license_id, licence in FLICKR_LICENSES.items():
        classified = license_from_info(license_id, licence.name, licence.url)
        assert classified.allowed == licence.allowed, license_id
        if license_id not in (0, 7, 8):
            assert classified == licence, license_id


@pytest.mark.parametrize("url,slug,allowed", [
    ("https://creativecommons.org/licenses/by/4.0/", "cc-by-4", True),
    ("http://creativecommons.org/licenses/by-nc-sa/4.0", "cc-by-nc-sa-4", True),
    ("https://creativecommons.org/licenses/by-nd/4.0/", "cc-by-nd-4", False),
    ("https://creativecommons.org/licenses/by-nc-nd/4.0/", "cc-by-nc-nd-4", False),
    ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0-1", True),
    ("https://creativecommons.org/publicdomain/mark/1.0/", "pdm-1", True),
    ("", "flickr-license-20", False),
    ("https://www.flickr.com/commons/usage/", "flickr-license-20", False),
    ("https://creativecommons.org.example.com/licenses/by/4.0/", "flickr-license-20", False),
    ("https://creativecommons.org/licenses/by/4.0/legalcode.de", "flickr-license-20", False)])
def test_looked_up_licences_are_classified_by_their_url(url, slug, allowed):
    assert license_from_info(20, "name", url)[1:3] == (slug, allowed)


def test_rules_decide_not_public_opt_out_tag_licence_and_unknown_licence():
    rules = ConsentRules()
    decide = lambda **kw: rules.decide(**{**dict(photo_id=1, license_id=4, clean_tags=["people"],  # noqa: E731
                                                 is_public=True, checked_at="t", method="m"), **kw})
    assert decide().ok
    assert decide(is_public=False).reason == "not_public"
    assert decide(clean_tags=["nocv"]).reason == "no_cv_tag"
    assert decide(license_id=0) == ConsentResult(1, "license_changed", "all-rights-reserved", 0,
                                                 "t", "m", "all-rights-reserved")
    assert decide(license_id=99).detail == "unknown id 99"
    assert decide(license_id=99, is_public=False).reason == "not_public"  # the licence comes last
    answer = {"photo": {"license": "5", "visibility": {"ispublic": 0}, "tags": {"tag": []}}}
    assert rules.from_info(7, answer, "t").reason == "not_public"


def test_result_metadata_records_the_check_time_and_the_licence_seen():
    result = ConsentRules().decide(1, 5, [], True, "2026-12-01T00:00:00Z", GET_INFO)
    assert result.metadata() == {"consent_checked_at": "2026-12-01T00:00:00Z",
                                 "consent_license_id": 5, "consent_license": "cc-by-sa-2"}
    assert tuple(result.metadata()) == CONSENT_COLUMNS


def test_process_rate_share_splits_the_job_rate_over_every_process():
    assert process_rate_share(1.0, 10, 4) == pytest.approx(0.025)
    assert process_rate_share(3.0) == 3.0
    with pytest.raises(ValueError):
        process_rate_share(0.0, 1, 1)
    with pytest.raises(ValueError):
        process_rate_share(1.0, 0, 1)


@pytest.mark.parametrize("url", ["ftp://api.flickr.com/", "http://10.0.0.1/services/rest/",
                                 "https://user@api.flickr.com/", "https://api.flickr.com/?a=1",
                                 "https://:443/", "http://127.0.0.1:99999/"])
def test_bad_api_urls_are_refused_at_launch(url):
    with pytest.raises(ValueError, match="flickr_api_url"):
        api_host_policy(url)


def test_api_key_is_required():
    with pytest.raises(ValueError, match="flickr_api_key"):
        CheckConsent(api_key="")


def test_a_public_name_that_resolves_to_loopback_is_refused(flickr_api):
    port = flickr_api.url.split(":")[2].split("/")[0]
    client = FlickrClient(ConsentConfig(api_url=f"http://api.example.test:{port}/services/rest/",
                                        api_key=API_KEY, **FAST),
                          resolve=lambda host, port: ["127.0.0.1"])
    result = ConsentChecker(client).check_photo(UNCHANGED)
    assert result.reason == "check_failed" and "non-public" in result.detail
    assert sum(flickr_api.calls.values()) == 0


# -- decisions against the fake ------------------------------------------------------------------


@pytest.mark.parametrize("photo_id", sorted(FATES))
def test_get_info_decides_each_fate(flickr_api, photo_id):
    result = _checker(flickr_api.url).check_photo(photo_id)
    assert (result.reason, result.method) == (FATES[photo_id], GET_INFO)
    assert result.checked_at == "2026-12-01T00:00:00Z"
    assert flickr_api.calls == {GET_INFO: 1}


def test_both_methods_give_the_same_decisions(flickr_api):
    records = [_record(photo_id) for photo_id in FATES]
    records += [_record(MANY_FIRST_ID + offset) for offset in range(100)]
    per_photo = _checker(flickr_api.url, listing_min_photos=10**9)
    listing = _checker(flickr_api.url, listing_min_photos=1)
    got_info, got_listing = per_photo.check_records(records), listing.check_records(records)
    assert _decisions(got_info) == _decisions(got_listing)
    reasons = {photo_id: result.reason for photo_id, result in got_listing.items()}
    assert {photo_id: reasons[photo_id] for photo_id in FATES} == FATES
    assert (reasons[MANY_FIRST_ID + 1], reasons[MANY_FIRST_ID + 2], reasons[MANY_FIRST_ID + 3]) \
        == ("no_cv_tag", "license_changed", "not_found")
    assert sum(1 for reason in reasons.values() if reason == "") == 1 + 97
    assert got_listing[MANY_FIRST_ID].method == GET_PUBLIC_PHOTOS
    # 105 getInfo calls; the listing: 3 pages for the many-photo user + 1 getInfo confirming the
    # photo absent from it, 1 page per other user + getInfo for the 2 absent photos.
    assert per_photo.client.calls == {GET_INFO: 105}
    assert listing.client.calls == {GET_PUBLIC_PHOTOS: 3 + 5, GET_INFO: 1 + 2}


def test_a_deleted_account_is_not_found_without_a_call_per_photo(flickr_api):
    checker = _checker(flickr_api.url)
    results = checker.check_user("404@N01", [_record(900 + n, "404@N01") for n in range(5)])
    assert {result.reason for result in results.values()} == {"not_found"}
    assert checker.client.calls == {GET_PUBLIC_PHOTOS: 1}


def test_the_method_is_chosen_per_user_by_the_calls_it_costs(flickr_api):
    checker = _checker(flickr_api.url)
    checker.check_user(MANY_USER, [_record(MANY_FIRST_ID), _record(MANY_FIRST_ID + 10)])
    assert checker.client.calls == {GET_INFO: 2}  # fewer than listing_min_photos
    checker.client.calls.clear()
    newest = MANY_FIRST_ID + 1233  # on page 1: decided there, no more pages
    checker.check_user(MANY_USER, [_record(newest - n) for n in range(3)])
    assert checker.client.calls == {GET_PUBLIC_PHOTOS: 1}
    checker.client.calls.clear()
    # 3 old photos (page 3): after page 1, 2 pages left < 3 undecided -> page 2; then 1 < 3 ->
    # page 3. 4 old photos after a first page: same. 2 undecided with 2 pages left -> getInfo.
    checker.check_user(MANY_USER, [_record(MANY_FIRST_ID + n) for n in (0, 4, 5)])
    assert checker.client.calls == {GET_PUBLIC_PHOTOS: 3}
    checker.client.calls.clear()
    checker.check_user(MANY_USER, [_record(newest), _record(MANY_FIRST_ID), _record(MANY_FIRST_ID + 4)])
    assert checker.client.calls == {GET_PUBLIC_PHOTOS: 1, GET_INFO: 2}


def test_calls_per_1000_photos():
    """A mix like a rebuild's: 400 owners with 1 photo to check, 100 with 2, 10 with 40 old
    photos among 1,200 public ones. getInfo alone would cost 1,000 calls."""
    world, records = mixed_world([(400, 1, 30), (100, 2, 80), (10, 40, 1200)])
    fake = serve(world)
    try:
        checker = _checker(fake.url)
        results = checker.check_records(records)
    finally:
        fake.stop()
    assert len(results) == 1000 and all(result.ok for result in results.values())
    assert checker.client.calls == {GET_INFO: 400 + 200, GET_PUBLIC_PHOTOS: 10 * 3}


# -- licence ids beyond the verified table: looked up once per client ------------------------------

RELICENSED = {30: CC_BY_4, 31: CC_BY_NC_SA_4, 32: CC_BY_ND_4, 33: UNLISTED_LICENSE}


def _relicensed_world(licenses=...) -> World:
    """Owner 30@N01: photo 29 unchanged, 30-33 relicensed to ids the table lacks."""
    world = World().add(FakePhoto(29, "30@N01"), *(FakePhoto(photo_id, "30@N01", license_id)
                                                   for photo_id, license_id in RELICENSED.items()))
    if licenses is not ...:
        world.licenses = licenses
    return world


@pytest.mark.parametrize("listing_min_photos", [10**9, 1], ids=["getInfo", "getPublicPhotos"])
def test_a_licence_id_beyond_the_table_is_looked_up_once_and_decided_by_its_url(listing_min_photos):
    fake = serve(_relicensed_world())
    try:
        checker = _checker(fake.url, listing_min_photos=listing_min_photos)
        results = checker.check_user("30@N01", [_record(p, "30@N01") for p in (29, *RELICENSED)])
        again = checker.check_photo(33)  # a later unknown id: the list is not asked again
    finally:
        fake.stop()
    assert {p: (r.reason, r.license) for p, r in results.items()} == {
        29: ("", "cc-by-2"), 30: ("", "cc-by-4"), 31: ("", "cc-by-nc-sa-4"),
        32: ("license_changed", "cc-by-nd-4"), 33: ("license_changed", None)}
    assert results[30].metadata() == {"consent_checked_at": "2026-12-01T00:00:00Z",
                                      "consent_license_id": CC_BY_4, "consent_license": "cc-by-4"}
    assert results[32].detail == "cc-by-nd-4 (https://creativecommons.org/licenses/by-nd/4.0/)"
    assert results[33].detail == f"unknown id {UNLISTED_LICENSE} (not in {GET_LICENSES})"
    assert again.reason == "license_changed"
    assert checker.client.calls[GET_LICENSES] == 1 and fake.calls[GET_LICENSES] == 1


def test_photos_with_verified_licences_never_ask_for_the_list(flickr_api):
    checker = _checker(flickr_api.url)
    checker.check_records([_record(photo_id) for photo_id in FATES])
    assert GET_LICENSES not in checker.client.calls


def test_a_refused_licence_list_is_a_licence_change_and_is_not_asked_again():
    fake = serve(_relicensed_world(licenses=None))  # the fake answers code 112
    try:
        checker = _checker(fake.url)
        first, second = checker.check_photo(30), checker.check_photo(31)
    finally:
        fake.stop()
    assert (first.reason, second.reason) == ("license_changed", "license_changed")
    assert first.detail.startswith(f"unknown id {CC_BY_4} ({GET_LICENSES} code 112")
    assert checker.client.calls == {GET_INFO: 2, GET_LICENSES: 1}


def test_a_licence_list_that_keeps_failing_is_a_failed_check_and_is_asked_again_later():
    fake = serve(_relicensed_world())
    fake.inject("ok", "503", "503")  # the photo's getInfo answers; both tries of the list fail
    try:
        checker = _checker(fake.url, retries=1)
        failed_now, later = checker.check_photo(30), checker.check_photo(30)
    finally:
        fake.stop()
    assert failed_now.reason == "check_failed" and "HTTP 503 after 2 tries" in failed_now.detail
    assert later.ok and later.license == "cc-by-4"
    assert checker.client.calls == {GET_INFO: 2, GET_LICENSES: 2 + 1}  # 2 failed tries, 1 answer


# -- retries and failures ------------------------------------------------------------------------


def test_transient_errors_are_retried_with_backoff_honouring_retry_after(flickr_api):
    sleeps: list[float] = []
    checker = _checker(flickr_api.url, sleeps, backoff_factor=0.25)
    flickr_api.inject("429", "105", "500", "503", "garbage")
    result = checker.check_photo(UNCHANGED)
    assert result.ok and result.license_id == 4
    assert flickr_api.calls == {GET_INFO: 6}
    assert sleeps == [1.0, 0.5, 1.0, 2.0, 4.0]  # Retry-After 1, then 0.25 * 2**n


def test_a_long_retry_after_is_capped(flickr_api):
    sleeps: list[float] = []
    flickr_api.inject("429-long")
    assert _checker(flickr_api.url, sleeps, retry_after_max=2.0).check_photo(UNCHANGED).ok
    assert sleeps == [2.0]


@pytest.mark.parametrize("faults,detail", [(["503"] * 6, "HTTP 503 after 6 tries"),
                                           (["105"] * 6, "code 105"), (["429"] * 6, "HTTP 429")])
def test_a_check_that_keeps_failing_is_a_reject_never_a_keep(flickr_api, faults, detail):
    flickr_api.inject(*faults)
    result = _checker(flickr_api.url, retries=5).check_photo(UNCHANGED)
    assert not result.ok and result.reason == "check_failed" and detail in result.detail
    assert result.license_id is None and API_KEY not in result.detail


def test_an_unreachable_api_is_a_failed_check(flickr_api):
    url = flickr_api.url
    flickr_api.stop()  # nothing listens on the port any more
    result = _checker(url, retries=1).check_photo(UNCHANGED)
    assert result.reason == "check_failed" and "after 2 tries" in result.detail
    assert API_KEY not in result.detail


def test_a_lasting_api_error_or_a_listing_outage_fails_the_check(flickr_api):
    bad_key = ConsentChecker(FlickrClient(ConsentConfig(api_url=flickr_api.url, api_key="wrong",
                                                        **FAST)))
    result = bad_key.check_photo(UNCHANGED)
    assert result.reason == "check_failed" and "code 100" in result.detail
    flickr_api.inject(*["500"] * 6)
    results = _checker(flickr_api.url, retries=5).check_user(
        MANY_USER, [_record(MANY_FIRST_ID + n) for n in range(5)])
    assert {result.reason for result in results.values()} == {"check_failed"}


# -- Beam ----------------------------------------------------------------------------------------


def test_check_consent_pipeline_pairs_kept_elements_and_rejects_each_photo_once(flickr_api):
    samples = [(_record(photo_id), f"{photo_id}-{index}") for photo_id in FATES
               for index in range(2)]
    samples += [(_record(MANY_FIRST_ID + n), f"many-{n}") for n in range(1, 6)]
    with make_pipeline(PipelineOptions([])) as pipeline:
        out = (pipeline | beam.Create(samples + ["not a sample"])
               | CheckConsent(flickr_api.url, API_KEY, requests_per_second=1000.0,
                              backoff_factor=0.0))
        assert_that(out.main | "Kept" >> beam.Map(
            lambda pair: (pair[0][1], pair[1].ok, pair[1].license_id,
                          sorted(pair[1].metadata()))),
            equal_to([(name, True, license_id, ["consent_checked_at", "consent_license",
                                                "consent_license_id"])
                      for name, license_id in [(f"{UNCHANGED}-0", 4), (f"{UNCHANGED}-1", 4),
                                               ("many-4", 2), ("many-5", 2)]]), label="kept")
        assert_that(out.rejects | "Rejects" >> beam.Map(
            lambda r: (r.stage, r.reason, r.photo_id)),
            equal_to([("consent", "no_record", None),
                      ("consent", "no_cv_tag", TAGGED_NO_CV),
                      ("consent", "license_changed", RELICENSED_ND),
                      ("consent", "not_found", DELETED), ("consent", "not_found", MADE_PRIVATE),
                      ("consent", "no_cv_tag", MANY_FIRST_ID + 1),
                      ("consent", "license_changed", MANY_FIRST_ID + 2),
                      ("consent", "not_found", MANY_FIRST_ID + 3)]), label="rejects")


def test_check_consent_pipeline_rejects_photos_whose_check_failed():
    fake = serve(World().add(FakePhoto(1, "1@N01")))
    fake.inject(*["503"] * 3)
    try:
        with make_pipeline(PipelineOptions([])) as pipeline:
            out = (pipeline | beam.Create([make_record(1, user_nsid="1@N01")])
                   | CheckConsent(fake.url, API_KEY, requests_per_second=1000.0,
                                  backoff_factor=0.0, retries=2))
            assert_that(out.main, equal_to([]), label="kept")
            assert_that(out.rejects | beam.Map(lambda r: (r.reason, r.photo_id)),
                        equal_to([("check_failed", 1)]), label="rejects")
    finally:
        fake.stop()


def test_consent_flags_give_the_stage_or_nothing_and_refuse_bad_values(flickr_api):
    parser = argparse.ArgumentParser()
    add_consent_arguments(parser, mode_help="the check")
    flags = vars(parser.parse_args([]))
    assert flags["consent_check"] == "off" and consent_from_flags(**flags) is None
    flags = vars(parser.parse_args(["--consent_check=api", f"--flickr_api_url={flickr_api.url}",
                                    "--flickr_api_key=K", "--flickr_requests_per_second=2"]))
    stage = consent_from_flags(**flags, max_num_workers=4, processes_per_worker=2)
    assert stage.config.requests_per_second == pytest.approx(0.25)
    assert stage.config.api_url == flickr_api.url
    with pytest.raises(ValueError, match="flickr_api_key"):
        consent_from_flags("api")
    with pytest.raises(ValueError, match="consent_check"):
        consent_from_flags("on")
