"""Stage 8: write FDH-compatible per-licence output (design.md section 5).

OUT/{licence}/{split}/out-NNNNNN.tar (WebDataset members per sample: image.png, mask.png,
maskrcnn_mask.png, e_mask.png, keypoints.npy, vertices.npy, json) + a Parquet file beside each tar,
and the run-level manifest.json, metadata.json (FDH fields), stats.json. Deterministic bytes,
write-then-rename everywhere. Beam: `samples | AssignSplit() | WriteShards(out)` -> shard entries,
then `WriteRunOutputs(out, config, versions, crawl_time)`; one process: `write_dataset(out, samples)`.
"""
from transforms.s8_write.encode import (DEFAULT_CRAWL_TIME, EMBEDDING_MEMBERS, MEMBER_ORDER,
                                        METADATA_FIELDS, PARQUET_SCHEMA, PNG_COMPRESS_LEVEL,
                                        SampleError, check_sample, encode_npy, encode_png,
                                        encode_sample, metadata_from_row, sample_metadata,
                                        sample_row, strip_embedding_members)
from transforms.s8_write.layout import (MAX_BYTES, MAX_SAMPLES, bucket_of, num_buckets, part_sizes,
                                        tar_size)
from transforms.s8_write.no_embeddings import strip_dataset, strip_shard
from transforms.s8_write.run_outputs import (FORMAT_VERSION, MANIFEST_FILE, METADATA_FILE,
                                             OPT_OUT_FILE, STATS_FILE, WriteRunOutputs, build_stats,
                                             code_versions, dataset_path, dumps, finalize_dataset,
                                             load_json, metadata_entries, remove_leftovers,
                                             resolve_crawl_time, save_json, write_metadata_json)
from transforms.s8_write.shards import (ShardInfo, TarShardWriter, iter_parquet_rows,
                                        parquet_path_for, read_parquet_rows, read_tar_shard,
                                        shard_entry, shard_path, write_bytes_atomic,
                                        write_parquet_shard, write_shard, write_tar_shard)
from transforms.s8_write.split import AssignSplit, assign_split, split_of
from transforms.s8_write.write import EncodedSample, WriteShards, encode_for_writing, write_dataset

__all__ = [
    "AssignSplit", "DEFAULT_CRAWL_TIME", "EMBEDDING_MEMBERS", "EncodedSample", "FORMAT_VERSION",
    "MANIFEST_FILE", "MAX_BYTES", "MAX_SAMPLES", "MEMBER_ORDER", "METADATA_FIELDS", "METADATA_FILE",
    "OPT_OUT_FILE", "PARQUET_SCHEMA", "PNG_COMPRESS_LEVEL", "STATS_FILE", "SampleError", "ShardInfo",
    "TarShardWriter", "WriteRunOutputs", "WriteShards", "assign_split", "bucket_of", "build_stats",
    "check_sample", "code_versions", "dataset_path", "dumps", "encode_for_writing", "encode_npy",
    "encode_png", "encode_sample", "finalize_dataset", "iter_parquet_rows", "load_json",
    "metadata_entries", "metadata_from_row", "num_buckets", "parquet_path_for", "part_sizes",
    "read_parquet_rows", "read_tar_shard", "remove_leftovers", "resolve_crawl_time", "sample_metadata",
    "sample_row", "save_json", "shard_entry", "shard_path", "split_of", "strip_dataset",
    "strip_embedding_members", "strip_shard", "tar_size", "write_bytes_atomic", "write_dataset",
    "write_metadata_json", "write_parquet_shard", "write_shard", "write_tar_shard",
]
