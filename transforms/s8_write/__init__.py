"""Stage 8: write FDH-compatible per-licence output (design.md section 5).

OUT/{licence}/{split}/out-NNNNNN.tar (WebDataset members per sample: image.png, mask.png,
maskrcnn_mask.png, e_mask.png, keypoints.npy, vertices.npy, json) + a Parquet file beside each tar,
and the run-level manifest.json, metadata.json (FDH fields), stats.json. The format (paths,
schemas, tar/Parquet files, atomic writes) is the `dataset` package's; this stage holds the write
side only: encoding, shard layout, split, `WriteShards` and `WriteRunOutputs`. Beam:
`samples | AssignSplit() | WriteShards(out)` -> StageOutput(shard entries, rejects), then
`WriteRunOutputs(out, config, versions, crawl_time)`.
"""
from transforms.s8_write.encode import (DEFAULT_CRAWL_TIME, PNG_COMPRESS_LEVEL, SampleError,
                                        check_writable, encode_npy, encode_png, encode_sample,
                                        metadata_from_row, sample_metadata, sample_row,
                                        strip_embedding_members)
from transforms.s8_write.layout import (MAX_BYTES, MAX_SAMPLES, bucket_of, num_buckets, part_sizes,
                                        tar_size)
from transforms.s8_write.no_embeddings import strip_shard
from transforms.s8_write.run_outputs import (WriteRunOutputs, code_versions, finalize_dataset,
                                             remove_leftovers, resolve_crawl_time)
from transforms.s8_write.split import AssignSplit, assign_split, split_of
from transforms.s8_write.write import (EncodedSample, EncodeSamples, WriteEncodedShards, WriteShards,
                                       encode_for_writing)

__all__ = [
    "AssignSplit", "DEFAULT_CRAWL_TIME", "EncodeSamples", "EncodedSample", "MAX_BYTES", "MAX_SAMPLES",
    "PNG_COMPRESS_LEVEL", "SampleError", "WriteEncodedShards", "WriteRunOutputs", "WriteShards", "assign_split",
    "bucket_of", "check_writable", "code_versions", "encode_for_writing", "encode_npy", "encode_png",
    "encode_sample", "finalize_dataset", "metadata_from_row", "num_buckets", "part_sizes",
    "remove_leftovers", "resolve_crawl_time", "sample_metadata", "sample_row", "split_of",
    "strip_embedding_members", "strip_shard", "tar_size",
]
