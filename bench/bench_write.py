"""Benchmark of stage 8 (writing): tar writer throughput vs plain tarfile, and peak memory vs input size.

    .venv/bin/python bench/bench_write.py [--samples 300] [--small 1000] [--large 10000] [--xlarge 20000]

1. MB/s of `write_tar_shard` (fixed headers, hashing, temp name + rename through Beam FileSystems)
   against plain `tarfile` writing the same encoded members to a file, same run; ratio printed.
2. ms per sample of `encode_sample` (PNG + npy encoding, the CPU cost per sample).
3. Peak RSS (VmHWM of a fresh subprocess, reset just before writing, so imports and the sample
   pool do not hide the writer's peak) of the Beam writer (`AssignSplit | WriteShards |
   WriteRunOutputs` on the local runner, tests/beam_writer.py) writing --small, --large and
   --xlarge samples with shards capped at 250 samples; the local runner holds the input list, so
   the peak grows with the input (the one-process spilling writer was removed as dead code). Also printed: the peak above the RSS just before writing, i.e. what the writer itself
   adds, and its ratios.
   Samples are crops of the skimage sample photos (natural image statistics, realistic PNG sizes),
   made lazily by a generator so the input itself costs no memory. To keep the runs short the
   worker encodes each PNG of the fixed crop pool once (a cache on `encode_png`): every sample is
   still distinct (key, record, `json` member, Parquet row) and goes through the whole writer.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORKER = r"""
import json, os, runpy, sys, time
sys.path.insert(0, sys.argv[1])
sample_stream = runpy.run_path(os.path.join(sys.argv[1], "bench", "bench_write.py"))["sample_stream"]
import transforms.s8_write.encode as encode
from tests.beam_writer import write_with_beam

pngs = {}
def cached_png(array, encode_png=encode.encode_png):  # the crop pool's arrays live all run long
    if id(array) not in pngs:
        pngs[id(array)] = (array, encode_png(array))
    return pngs[id(array)][1]
encode.encode_png = cached_png

def status_mib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024

count, out = int(sys.argv[2]), sys.argv[3]
stream = sample_stream(count)
first = next(stream)
encode.encode_sample(first)  # warm the imports and the PNG cache of the first crop
baseline = status_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # reset the peak (VmHWM) to now: imports and the crop pool are not the writer's
def samples():
    yield first
    yield from stream
start = time.perf_counter()
manifest = write_with_beam(out, samples(), max_samples=250, val_fraction=0.017)
print(json.dumps({"seconds": time.perf_counter() - start, "baseline_rss_mib": baseline,
                  "peak_rss_mib": status_mib("VmHWM"),
                  "shards": len(manifest["shards"]),
                  "samples": sum(e["samples"] for e in manifest["shards"])}))
"""


def _crops():
    import numpy as np
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for photo in photos:
        h, w = photo.shape[:2]
        for y in range(0, h - 288, max(1, (h - 288) // 4)):
            for x in range(0, w - 160, max(1, (w - 160) // 4)):
                crops.append(np.ascontiguousarray(photo[y:y + 288, x:x + 160]))
    return crops


def sample_stream(count: int):
    """`count` distinct FdhSamples (keys, users) over a fixed pool of natural-image crops."""
    import dataclasses

    from tests.factories import make_record, make_sample

    crops = _crops()
    base = make_sample(1, 0)
    for i in range(count):
        photo_id = 10_000_000 + i // 2
        record = make_record(photo_id, user_nsid=f"{i % 997}@N01")
        yield dataclasses.replace(base, key=f"{photo_id}_{i % 2}", record=record, person_index=i % 2,
                                  image=crops[i % len(crops)])


def bench_tar(samples: int) -> dict:
    from dataset.shards import write_tar_shard
    from transforms.s8_write import encode_sample

    stream = list(sample_stream(samples))
    start = time.perf_counter()
    members = [encode_sample(sample) for sample in stream]
    encode_ms = (time.perf_counter() - start) * 1000 / samples
    payload = sum(len(v) for m in members for k, v in m.items() if k != "__key__")
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(3):
            start = time.perf_counter()
            write_tar_shard(os.path.join(tmp, "cc-by-2", "train", "out-000000.tar"), members)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            with tarfile.open(os.path.join(tmp, "plain.tar"), "w") as tar:
                for m in members:
                    for extension, data in m.items():
                        if extension == "__key__":
                            continue
                        info = tarfile.TarInfo(f"{m['__key__']}.{extension}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            plain.append(time.perf_counter() - start)
    mib = payload / 2**20
    return {"samples": samples, "payload_mib": round(mib, 1), "encode_ms_per_sample": round(encode_ms, 2),
            "ours_mib_s": round(mib / min(ours), 1), "tarfile_mib_s": round(mib / min(plain), 1),
            "ratio_ours_over_tarfile": round(min(plain) / min(ours), 3)}


def bench_memory(count: int, repo: str = REPO) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", WORKER, repo, str(count), os.path.join(tmp, "out")],
                                capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="samples in the tar throughput test")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--xlarge", type=int, default=20000)
    parser.add_argument("--repo", default=REPO, help="measure the writer of another checkout (before/after)")
    args = parser.parse_args()
    tar = bench_tar(args.samples)
    print(f"tar writer: {tar['ours_mib_s']} MiB/s vs plain tarfile {tar['tarfile_mib_s']} MiB/s "
          f"(ratio {tar['ratio_ours_over_tarfile']}; {tar['payload_mib']} MiB, {tar['samples']} samples)")
    print(f"encode_sample: {tar['encode_ms_per_sample']} ms per sample (PNG + npy, one core)")
    runs = [bench_memory(count, args.repo) for count in (args.small, args.large, args.xlarge)]
    for result in runs:
        added = result["peak_rss_mib"] - result["baseline_rss_mib"]
        print(f"Beam writer {result['samples']:>6} samples: peak RSS {result['peak_rss_mib']:.0f} MiB "
              f"({added:.0f} MiB above the {result['baseline_rss_mib']:.0f} MiB before writing), "
              f"{result['seconds']:.1f} s ({1000 * result['seconds'] / result['samples']:.2f} ms/sample), "
              f"{result['shards']} shards")
    small = runs[0]
    for result in runs[1:]:
        ratio = result["peak_rss_mib"] / small["peak_rss_mib"]
        added = ((result["peak_rss_mib"] - result["baseline_rss_mib"])
                 / max(1e-9, small["peak_rss_mib"] - small["baseline_rss_mib"]))
        print(f"peak memory ratio {result['samples']}/{small['samples']} samples "
              f"({result['samples'] / small['samples']:.0f}x): {ratio:.3f} in RSS, {added:.2f} in the "
              f"writer's own memory (flat = ~1)")


if __name__ == "__main__":
    main()
