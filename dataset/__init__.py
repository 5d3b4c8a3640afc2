"""The FDH dataset on disk: the one package that knows its format.

A dataset is OUT/{licence}/{split}/out-NNNNNN.tar (WebDataset members per sample) with a Parquet
file of the same stem beside each tar, and manifest.json, metadata.json, stats.json and
opt_out.txt in the root. Modules: `fs` (Beam FileSystems I/O, the atomic write, JSON files),
`layout` (paths, file and member names), `schema` (Parquet, metadata.json, stats.json),
`shards` (tar and Parquet read/write), `manifest`, `metadata` (metadata.json from the Parquet
files), and the pure cores of the maintenance jobs: `search`, `takedown`, `verify`, `stats`.
The write side (encoding samples, planning shards) lives in `transforms.s8_write`.
"""
