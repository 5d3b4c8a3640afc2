"""Job-wide Flickr politeness: --flickr_requests_per_second and --flickr_concurrency are the whole
job's; each fetch process gets its share (workers x SDK processes per worker)."""
from __future__ import annotations

import pytest

from beam_jobs import rebuild
from beam_jobs.common import UsageError, split_job_flags
from transforms.s3_fetch import FetchConfig, FetchImages, process_share

pytestmark = pytest.mark.unit


def test_a_process_gets_its_share_of_the_job_rate_and_concurrency():
    share = process_share(FetchConfig(flickr_requests_per_second=8.0, flickr_concurrency=16), 4)
    assert (share.flickr_requests_per_second, share.flickr_concurrency) == (2.0, 4)


def test_concurrency_stays_at_least_one_and_no_cap_stays_no_cap():
    share = process_share(FetchConfig(flickr_requests_per_second=None, flickr_concurrency=4), 40)
    assert (share.flickr_requests_per_second, share.flickr_concurrency) == (None, 1)
    with pytest.raises(ValueError, match="processes"):
        process_share(FetchConfig(), 0)


def test_fetch_images_reads_the_flickr_caps_as_job_wide_only_when_told():
    per_process = FetchImages("flickr", flickr_requests_per_second=4.0)
    job_wide = FetchImages("flickr", flickr_requests_per_second=4.0, processes=8)
    assert per_process._config.flickr_requests_per_second == 4.0
    assert job_wide._config.flickr_requests_per_second == 0.5


def _processes(*flags: str) -> int:
    options, _ = split_job_flags(rebuild.RebuildOptions, ["--yfcc=a", "--output=o", *flags])
    return rebuild.fetch_processes(options)


def test_processes_of_a_job_from_its_workers_and_machine_type():
    assert _processes() == 1
    assert _processes("--direct_num_workers=3", "--direct_running_mode=multi_processing") == 3
    assert _processes("--direct_num_workers=3") == 1  # threads in one process share one bucket
    remote = ("--runner=DataflowRunner", "--max_num_workers=10")
    assert _processes(*remote) == 10  # Dataflow's batch default n1-standard-1: one process
    assert _processes(*remote, "--machine_type=n1-standard-8") == 80
    assert _processes(*remote, "--machine_type=n2-highmem-4", "--sdk_processes_per_worker=1") == 10
    with pytest.raises(UsageError, match="sdk_processes_per_worker"):
        _processes(*remote, "--sdk_processes_per_worker=0")
