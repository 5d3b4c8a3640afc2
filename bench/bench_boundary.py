"""Bytes per photo on each edge between the CPU and the GPU environments of a rebuild.

    .venv/bin/python bench/bench_boundary.py [--annotator lite] [--copies 1]

Steps in different environments cannot fuse, so Dataflow materialises (and shuffles) what crosses
the boundary. The rebuild's GPU composite (transforms.gpu_stage) takes the fetched bytes + record
(`FetchedImage`) and gives back encoded samples (`EncodedSample`) and rejects. This bench runs the
demo world (beam_jobs.demo) through the rebuild's own fetch and GPU composite on the local runner,
keeps the elements of both edges, and encodes each with the coder the pipeline uses for that
PCollection (its element_type's coder from Beam's registry; for these types Beam falls back to
pickling). Printed: bytes in per photo / the fetched file (target <= 1.1) and bytes out / the
samples' encoded size (the tar bytes they add to a shard; target <= 1.1), and, for scale, what
the old boundary carried: the decoded photo (`DecodedImage`) under the same coder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)



def _keep(element, folder: str) -> None:
    """Save one element of an edge (pickled) under `folder` (DoFns are pickled: no shared list)."""
    import pickle
    import uuid

    with open(os.path.join(folder, uuid.uuid4().hex), "wb") as out:
        pickle.dump(element, out)


def _kept(folder: str) -> list:
    import pickle

    items = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as stream:
            items.append(pickle.load(stream))
    return items


def run_edges(annotator: str, work: str) -> tuple[object, object, list, list]:
    """Run fetch + GPU composite on the demo world; returns the two edges' element types and
    elements."""
    import apache_beam as beam

    from beam_jobs import demo, rebuild
    from beam_jobs.common import make_pipeline, split_job_flags
    from transforms.s2_prefilter import ReadAndPrefilter
    from transforms.s3_fetch import FetchImages
    from transforms.s8_write import WriteShards

    yfcc, mirror = demo.build_sample(os.path.join(work, "input"))
    job, pipeline_options = split_job_flags(rebuild.RebuildOptions, [
        f"--yfcc={yfcc}", f"--output={work}/out", f"--image_source=mirror:{mirror}",
        f"--annotator={annotator}", "--crawl_time=1637341702"])
    no_embeddings = job.no_embeddings or annotator == "lite"
    write_shards = WriteShards(job.output, no_embeddings=no_embeddings, crawl_time=job.crawl_time)
    with make_pipeline(pipeline_options) as pipeline:
        fetched = (pipeline | ReadAndPrefilter([yfcc])).main | FetchImages(job.image_source)
        encoded = fetched.main | "GpuStage" >> rebuild.gpu_stage(job, write_shards, no_embeddings)
        for edge, pcoll in (("in", fetched.main), ("out", encoded.main)):
            os.makedirs(os.path.join(work, edge))
            _ = pcoll | f"Keep_{edge}" >> beam.Map(_keep, os.path.join(work, edge))
        types = fetched.main.element_type, encoded.main.element_type
    return (*types, _kept(os.path.join(work, "in")), _kept(os.path.join(work, "out")))


def coded_size(coder, element) -> int:
    return len(coder.encode(element))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotator", default="lite", choices=("lite", "fdh"))
    args = parser.parse_args(argv)
    import apache_beam as beam

    from transforms.records import DecodedImage
    from transforms.s4_decode import decode_image

    with tempfile.TemporaryDirectory() as work:
        in_type, out_type, fetched, encoded = run_edges(args.annotator, work)
    in_coder = beam.coders.registry.get_coder(in_type)
    out_coder = beam.coders.registry.get_coder(out_type)
    assert fetched and encoded, "the demo world gave no elements"
    file_bytes = sum(len(item.data) for item in fetched)
    in_bytes = sum(coded_size(in_coder, item) for item in fetched)
    sample_bytes = sum(item.size for item in encoded)
    out_bytes = sum(coded_size(out_coder, item) for item in encoded)
    decoded_bytes = 0
    for item in fetched:
        array, info = decode_image(item.data)
        decoded_bytes += coded_size(in_coder, DecodedImage(record=item.record, image=array, sha256=info.sha256,
                                                           original_size=info.original_size, url=item.url))
    print(f"coders: in {type(in_coder).__name__} ({in_type}), out {type(out_coder).__name__} ({out_type})")
    print(f"photos in: {len(fetched)}  samples out: {len(encoded)}")
    print(f"in : {in_bytes / len(fetched):12,.0f} B/photo  fetched file {file_bytes / len(fetched):12,.0f} "
          f"B/photo  ratio {in_bytes / file_bytes:.3f}  (target <= 1.1)")
    print(f"out: {out_bytes / len(encoded):12,.0f} B/sample encoded sample {sample_bytes / len(encoded):10,.0f} "
          f"B/sample ratio {out_bytes / sample_bytes:.3f}  (target <= 1.1)")
    print(f"old boundary (decoded photo): {decoded_bytes / len(fetched):12,.0f} B/photo, "
          f"{decoded_bytes / in_bytes:.1f}x what crosses in now")


if __name__ == "__main__":
    main()
