"""Golden bytes: the on-disk format did not change when the code moved into `dataset/`.

A small world (two licences, both splits, several shards, one NoDerivs reject) is written through
the Beam writer (`AssignSplit | WriteShards | WriteRunOutputs`), then edited by the takedown job
and stripped by the strip_embeddings job. The sha256 of every output file must equal the digests
recorded on the base commit ec5f786, before the move (re-recorded once when the
keys became integers, issue 12). The manifest's `versions` block is pinned
(every `code_versions()` key overridden), so the digests do not depend on installed versions.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import strip_embeddings, takedown
from beam_jobs.common import make_pipeline
from tests.factories import make_sample
from transforms.rejects import CountRejects

LICENCES = [("cc-by-2", "Attribution License"),
            ("cc-by-nc-sa-2", "Attribution-NonCommercial-ShareAlike License")]
CRAWL_TIME = 1637341702.5
PINNED_VERSIONS = {name: "golden" for name in (
    "fdh_beam", "apache_beam", "numpy", "pillow", "pyarrow", "python", "zlib", "model")}
VICTIM = "1@N01"


def _samples() -> list:
    samples = []
    for i in range(10):
        slug, name = LICENCES[i % 2]
        samples += [make_sample(5000 + i, j, license=slug, license_name=name,
                                user_nsid=f"{i % 4}@N0{i % 3}") for j in range(2)]
    samples.append(make_sample(9999, 0, license="cc-by-nd-2"))  # becomes a write reject
    return samples


def _write_world(out: str) -> None:
    from transforms.s8_write import AssignSplit, WriteRunOutputs, WriteShards

    with make_pipeline(PipelineOptions([])) as pipeline:
        write = WriteShards(out, max_samples=4, crawl_time=CRAWL_TIME)
        written = pipeline | beam.Create(_samples()) | AssignSplit(val_fraction=0.3) | write
        counts = written.rejects | CountRejects()
        _ = {"shards": written.main, "counts": counts} | WriteRunOutputs(
            out, config=write.config, versions=PINNED_VERSIONS, crawl_time=CRAWL_TIME)


def _digests(root: str) -> dict[str, str]:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return dict(sorted(found.items()))


def _build_all(tmp_path) -> dict[str, dict[str, str]]:
    """Relative paths (run from tmp_path): the stripped manifest records `derived_from`."""
    written = "written"
    _write_world(written)
    edited = "edited"
    shutil.copytree(written, edited)
    takedown.run([f"--dataset={edited}", f"--user_nsid={VICTIM}", "--photo_id=5003",
                  f"--report={tmp_path / 'takedown_report.json'}"])
    stripped = "stripped"
    strip_embeddings.run([f"--dataset={written}", f"--output={stripped}"])
    return {"written": _digests(written), "edited": _digests(edited), "stripped": _digests(stripped)}


# Recorded on ec5f786 (before the move) with PRINT_GOLDEN=1.
GOLDEN: dict[str, dict[str, str]] = {'edited': {'cc-by-2/train/out-000000.parquet': '78b05c4d282936719d162cfa2b12b04e5a0276379403d5b34af42f1de19270ba',
            'cc-by-2/train/out-000000.tar': '1413d7cc928bc68919ef93ebec0eae7933b805c5b383d8a3685ce318335084bb',
            'cc-by-2/train/out-000001.parquet': '2f2c09e784a6fe8338ac24aab1603a0d583f3c46b549766c9f4ba6aeb1bd6945',
            'cc-by-2/train/out-000001.tar': 'd2fc63307c41b948a066bbb77a7b53edb9e341b0fb420f042f305b53bf873c6c',
            'cc-by-2/val/out-000000.parquet': '04fd06e5cddfef5b294c91ea0a40c978f86da3eeae4768f2821d51384a88d5a8',
            'cc-by-2/val/out-000000.tar': 'a70ab47094cebd848c247a7af4be1fc52b70a6718c0b2fe1808fbc3befb3b98a',
            'cc-by-2/val/out-000001.parquet': '7d12bfc1bc92812f6cb6a55e10636cd5d58616f6c616562e8d1dbea407dced4d',
            'cc-by-2/val/out-000001.tar': '48e2c92b65824f3beb59d1ff312c3e2ecf03f03b0de433f64d0351a9887dbc70',
            'cc-by-nc-sa-2/train/out-000000.parquet': '9e5e1bf46583dafc61ae433c1c8c42b52622b9381d3ac26b6d894afb908cdd02',
            'cc-by-nc-sa-2/train/out-000000.tar': 'd717b7dc8f3098fdd6dcf0fa8a0fc87aff9bd81da9fe9c4b1c3c67dc7cf99421',
            'cc-by-nc-sa-2/train/out-000001.parquet': '63154601d2c6e0da4498b10ec36dd800783b5035c72298059c22d0ed99e2202a',
            'cc-by-nc-sa-2/train/out-000001.tar': '19b2d35c543ae2bce718a9065e4905ab34362876db5e26957ea2e7b677f1e1f5',
            'cc-by-nc-sa-2/train/out-000002.parquet': 'f89f98fcf0ebc07d1bd87d3a8fb144a72ff5d67addced5b4c28a5494ec586433',
            'cc-by-nc-sa-2/train/out-000002.tar': '82bb0c6005c8aaf81bcbeb129da3c28f4e67269feb1e26dea9fc09c92bc2a1ce',
            'cc-by-nc-sa-2/val/out-000000.parquet': '74b5e2198e16cf533bf5da5d0a9773b623219b41f75f9fe8010c9da4d1339114',
            'cc-by-nc-sa-2/val/out-000000.tar': '84ff92691f909a05b224e1c56abb4864f01b4f8e3c854e4bb4c7baf1d3f6d652',
            'manifest.json': '208c14ffaa9702a3ad79db0a70bbda80a3d0b95fca4ce9f3104d52863a656529',
            'metadata.json': 'e59b443ed9b289ae9116c8e1bae65d8ea0ca74c2e862737eb7710b8694b0c2df',
            'opt_out.txt': '999979635f91486db928a2e5bd52fae8cfed515f90e4ff184ba9bcb3f4f3b665',
            'stats.json': '30b10e953bc2a253e956b659de2bc1840ea34bd22067e9123cd569eeee463425'},
 'stripped': {'cc-by-2/train/out-000000.parquet': '78b05c4d282936719d162cfa2b12b04e5a0276379403d5b34af42f1de19270ba',
              'cc-by-2/train/out-000000.tar': 'bb6fdb1cafdb12d9d6608df57b22db4a61f93153cf67f805367a63fae7457052',
              'cc-by-2/train/out-000001.parquet': '2f2c09e784a6fe8338ac24aab1603a0d583f3c46b549766c9f4ba6aeb1bd6945',
              'cc-by-2/train/out-000001.tar': 'ed44d8b597d50299966db227441e7b3bf41d1288ca53047ac171220f18b58247',
              'cc-by-2/val/out-000000.parquet': '04fd06e5cddfef5b294c91ea0a40c978f86da3eeae4768f2821d51384a88d5a8',
              'cc-by-2/val/out-000000.tar': 'f1e60e3757343726acf9095f99843a36b1cfe043344f04eb3a7c9f2127bf6a50',
              'cc-by-2/val/out-000001.parquet': '7d12bfc1bc92812f6cb6a55e10636cd5d58616f6c616562e8d1dbea407dced4d',
              'cc-by-2/val/out-000001.tar': 'ba1661f19ae3a10b560e1a8d401057c5eae974c9c9869d180037cf101ca22c1f',
              'cc-by-nc-sa-2/train/out-000000.parquet': 'a4091a977b1264bd938d64e12067aab44a8672bfa8e4e15d4b12f50318b0e313',
              'cc-by-nc-sa-2/train/out-000000.tar': '588db6ec922eb4eba46b5d1840595b11f5d720c526ec7b17507118bab3070a05',
              'cc-by-nc-sa-2/train/out-000001.parquet': '8b4231b73095c52d3caf05b4484379be464971d9e95f51bcab080551dc735115',
              'cc-by-nc-sa-2/train/out-000001.tar': '4b91bd488ef424bd2282ebb016e09de8d503cd7bef3b29290de1910a82a6aa4c',
              'cc-by-nc-sa-2/train/out-000002.parquet': 'f89f98fcf0ebc07d1bd87d3a8fb144a72ff5d67addced5b4c28a5494ec586433',
              'cc-by-nc-sa-2/train/out-000002.tar': '4ab40359d186d75064d05b53eb5e725c0055494b6ff1f7c23b7eedc711c209f5',
              'cc-by-nc-sa-2/val/out-000000.parquet': 'def77d0949ce5a6665c7ba26b9bdf33f730270840387a324fbe289436c21b40a',
              'cc-by-nc-sa-2/val/out-000000.tar': '7c8343f8ce52782527b58549d1f631a86a160f663f7986bc272b75822312b359',
              'manifest.json': '93f9c16c7a0f242859f07a110deebca9aafccfbc15d22eeb9ab596211dc9889b',
              'metadata.json': 'e58a4d5eab93221b959895e7bf9431923ed695e915d44656e4427a748b68e314',
              'stats.json': 'dab1750fd62d5bb5867844cb6c381a2b895c25dc9923b66e26c11f9909a7b306'},
 'written': {'cc-by-2/train/out-000000.parquet': '78b05c4d282936719d162cfa2b12b04e5a0276379403d5b34af42f1de19270ba',
             'cc-by-2/train/out-000000.tar': '1413d7cc928bc68919ef93ebec0eae7933b805c5b383d8a3685ce318335084bb',
             'cc-by-2/train/out-000001.parquet': '2f2c09e784a6fe8338ac24aab1603a0d583f3c46b549766c9f4ba6aeb1bd6945',
             'cc-by-2/train/out-000001.tar': 'd2fc63307c41b948a066bbb77a7b53edb9e341b0fb420f042f305b53bf873c6c',
             'cc-by-2/val/out-000000.parquet': '04fd06e5cddfef5b294c91ea0a40c978f86da3eeae4768f2821d51384a88d5a8',
             'cc-by-2/val/out-000000.tar': 'a70ab47094cebd848c247a7af4be1fc52b70a6718c0b2fe1808fbc3befb3b98a',
             'cc-by-2/val/out-000001.parquet': '7d12bfc1bc92812f6cb6a55e10636cd5d58616f6c616562e8d1dbea407dced4d',
             'cc-by-2/val/out-000001.tar': '48e2c92b65824f3beb59d1ff312c3e2ecf03f03b0de433f64d0351a9887dbc70',
             'cc-by-nc-sa-2/train/out-000000.parquet': 'a4091a977b1264bd938d64e12067aab44a8672bfa8e4e15d4b12f50318b0e313',
             'cc-by-nc-sa-2/train/out-000000.tar': 'ccf2196a79a2b7421bb8b9d9ad0e9b05b07a7f75f6ad7fbb39826f114644ecc7',
             'cc-by-nc-sa-2/train/out-000001.parquet': '8b4231b73095c52d3caf05b4484379be464971d9e95f51bcab080551dc735115',
             'cc-by-nc-sa-2/train/out-000001.tar': '78b2ee6fdb111d931df4b209f68c862f08b6d689584a575c7ccf333db011ae69',
             'cc-by-nc-sa-2/train/out-000002.parquet': 'f89f98fcf0ebc07d1bd87d3a8fb144a72ff5d67addced5b4c28a5494ec586433',
             'cc-by-nc-sa-2/train/out-000002.tar': '82bb0c6005c8aaf81bcbeb129da3c28f4e67269feb1e26dea9fc09c92bc2a1ce',
             'cc-by-nc-sa-2/val/out-000000.parquet': 'def77d0949ce5a6665c7ba26b9bdf33f730270840387a324fbe289436c21b40a',
             'cc-by-nc-sa-2/val/out-000000.tar': '37578bbbd53f3a32963d3771432668984aca1403da6c16fb04d55bccebe54fa1',
             'manifest.json': 'a599ce85b5540a8a4945f36f7fa834e038a17637587cf50c73f86d0e254ce739',
             'metadata.json': 'e58a4d5eab93221b959895e7bf9431923ed695e915d44656e4427a748b68e314',
             'stats.json': '6f765f82306b51f4df31b90886ee7d18511713afef501d137de0095d13a6a80a'}}


@pytest.mark.slow
def test_outputs_are_byte_identical_to_the_base_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = _build_all(tmp_path)
    if os.environ.get("PRINT_GOLDEN"):
        import pprint
        pprint.pprint(found, width=120)
    assert found == GOLDEN
