"""Golden bytes: the on-disk format did not change when the code moved into `dataset/`.

A small world (two licences, both splits, several shards, one NoDerivs reject) is written through
the Beam writer (`AssignSplit | WriteShards | WriteRunOutputs`), then edited by the takedown job
and stripped by the strip_embeddings job. The sha256 of every output file must equal the digests
recorded on the base commit ec5f786, before the move (re-recorded once when the keys became
integers, issue 12, and once when the Parquet rows gained the consent columns, issue 15). The
manifest's `versions` block is pinned (every `code_versions()` key overridden), so the digests
do not depend on installed versions.
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
        written = (pipeline | beam.Create(_samples()) | AssignSplit(val_fraction=0.3)).main | write
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


# Recorded on ec5f786 (before the move) with PRINT_GOLDEN=1, then re-recorded ONCE on purpose
# (branch `faithful`, issue 12): sample keys became FDH-compatible integers (photo_id * 1000 +
# person_index, records.sample_key), which changes `__key__`, Parquet, metadata.json and the
# bucketing of samples into shards. The old digests still passed with the old keys (checked).
# Re-recorded ONCE more on purpose (branch `consent15`, issue 15): the Parquet rows gained the
# nullable consent columns (CONSENT_COLUMNS, null here), which changes every .parquet file and the
# manifests that hold their sha256; every tar, metadata.json, stats.json and opt_out.txt is the
# same (checked).
GOLDEN: dict[str, dict[str, str]] = {'edited': {'cc-by-2/train/out-000000.parquet': '090c43d0048aaeba304843b268c660598dfe9056656fc47e2b3035efb0221c54',
            'cc-by-2/train/out-000000.tar': '0e495f41871570fb08bc065103731774a1a4018a72630c086890759a2399cc18',
            'cc-by-2/train/out-000001.parquet': 'd09f6f30a5a89467b25af5d5cb63a2c745e3935300202b523813096407077095',
            'cc-by-2/train/out-000001.tar': 'bc26aa6d0d0f5eb94fdb9a4e4c309827d9535c43b828469b397b9d72e6a7255c',
            'cc-by-2/val/out-000000.parquet': 'cfb2a3860d101a278c30aec25862b15631c5353f5171ade19b5c32b88b6667cd',
            'cc-by-2/val/out-000000.tar': '8a9a655d16584507902443e9fedf91c104440dbb19f9518a3823450b34f8f69a',
            'cc-by-2/val/out-000001.parquet': '0e30ff8fe96d34df579e0c225887085ba91ef8a32051eeaed00b24c4655f1830',
            'cc-by-2/val/out-000001.tar': '1f8ae72bf336f458a0a949ccc6c7cd3b41042d9b2ee9205f5a9274ac78a11149',
            'cc-by-nc-sa-2/train/out-000000.parquet': 'b13599a969025e5cdf73d4b4f86094ff67454dcb5d97a851a7b5f2ee1e7f1f8f',
            'cc-by-nc-sa-2/train/out-000000.tar': 'd7f014e365136f908cbe4548ec08e7c8e2227391e543e9103e20929ed6e7bb61',
            'cc-by-nc-sa-2/train/out-000001.parquet': 'db2dc0a0434a69659447aaf56932232e50225fcbe758193b406e3a529dc7f731',
            'cc-by-nc-sa-2/train/out-000001.tar': '9c312c71cbfcd731ebc76ffda830a6d2972eb5319014f9bf07406101dd52f137',
            'cc-by-nc-sa-2/train/out-000002.parquet': 'cc4d15ee62a4a95c2d669ebfbc27013a7e9c6f0f896325baee00c4360bebad2d',
            'cc-by-nc-sa-2/train/out-000002.tar': '1e5d700f50eca5f84ef35db64174fa0005d49793f406d0d90d4d60102c50ccfd',
            'cc-by-nc-sa-2/train/out-000003.parquet': '0749736b5ffac65d6b8fae499b2ee58c57b3971689ba1607d47b61aaaf162898',
            'cc-by-nc-sa-2/train/out-000003.tar': '8c3dddbcb5858589fa6e4bda3916ad22790c74a4be881ff01528558d79ed0bd1',
            'cc-by-nc-sa-2/val/out-000000.parquet': 'aece2b82c23a2f40a8daf945363861d14c4a920ee7ab1c989528244362e7b185',
            'cc-by-nc-sa-2/val/out-000000.tar': '84ff92691f909a05b224e1c56abb4864f01b4f8e3c854e4bb4c7baf1d3f6d652',
            'manifest.json': '276e7a19d5664653c358a467a5c62c7de3b31168489d48cfa631195fe77021cb',
            'metadata.json': 'aad8f9cd6f5aaa7779da4ea8b92746880a4801d6f06204359f98f0ca9579577e',
            'opt_out.txt': '999979635f91486db928a2e5bd52fae8cfed515f90e4ff184ba9bcb3f4f3b665',
            'stats.json': '268a021e12bd723704273d60ce422b68766b82a9e5ff96b35548ae9563152bc1'},
 'stripped': {'cc-by-2/train/out-000000.parquet': '090c43d0048aaeba304843b268c660598dfe9056656fc47e2b3035efb0221c54',
              'cc-by-2/train/out-000000.tar': 'c4d5fcdd5fd1bafe83b228a3347a4fb8b9d7f254d8416825fa522d84e771a31f',
              'cc-by-2/train/out-000001.parquet': 'd09f6f30a5a89467b25af5d5cb63a2c745e3935300202b523813096407077095',
              'cc-by-2/train/out-000001.tar': '3ae987c599386de60c092502bb3e6580e22e408e7919f51e8b26cb6d64fa6823',
              'cc-by-2/val/out-000000.parquet': 'cfb2a3860d101a278c30aec25862b15631c5353f5171ade19b5c32b88b6667cd',
              'cc-by-2/val/out-000000.tar': 'd0ff6c5ccbcb3ad29d4b5aecc3d879366fcf2abe5850d054aeb0700548ce063b',
              'cc-by-2/val/out-000001.parquet': '0e30ff8fe96d34df579e0c225887085ba91ef8a32051eeaed00b24c4655f1830',
              'cc-by-2/val/out-000001.tar': '70788853bcad5d4333cacd315f47cc87e0355143488248d5d194d8e1e86d86a8',
              'cc-by-nc-sa-2/train/out-000000.parquet': 'b13599a969025e5cdf73d4b4f86094ff67454dcb5d97a851a7b5f2ee1e7f1f8f',
              'cc-by-nc-sa-2/train/out-000000.tar': 'a9c253f0378049a62b2b9e75a842720161403625f7c507bf8888412009ac7741',
              'cc-by-nc-sa-2/train/out-000001.parquet': '45263af3b285424f7b9ec91073c1efcab9581932138eeb0766f17de13addd103',
              'cc-by-nc-sa-2/train/out-000001.tar': 'fbb1a6b28ad2435720ad394e24e702d0465b2d38ed07568b3b7cc1ae166e6e9d',
              'cc-by-nc-sa-2/train/out-000002.parquet': 'cc4d15ee62a4a95c2d669ebfbc27013a7e9c6f0f896325baee00c4360bebad2d',
              'cc-by-nc-sa-2/train/out-000002.tar': '82f919fd9ad549deb991482ae306497f037a1325facc700ab6b3d431f8760629',
              'cc-by-nc-sa-2/train/out-000003.parquet': '0749736b5ffac65d6b8fae499b2ee58c57b3971689ba1607d47b61aaaf162898',
              'cc-by-nc-sa-2/train/out-000003.tar': 'af279ad29da962f6ba9bb647de7281155ab5f10ec6bca8aeaeae29abe4ac7c46',
              'cc-by-nc-sa-2/val/out-000000.parquet': 'f12c83095225c76d17d43317aabb128c057540ae657577a5857d4b56ea131dbd',
              'cc-by-nc-sa-2/val/out-000000.tar': 'e695edea40eaacb9ad913220a1fbee9dbde5e046dd8de6ff77d999e6841e5f84',
              'manifest.json': '39dc0ad5792328fda56c57ef55f0eadc81c80f949f734ba766977f1836c31bfc',
              'metadata.json': 'b49c2da8f6d8cc0183527683d258d8376d7ed3c988f37c713c00b2096d4d3a89',
              'stats.json': 'f763475c200223327b04023814cd8b348862f4512ce3ea6dd900fab2cc5c2df4'},
 'written': {'cc-by-2/train/out-000000.parquet': '090c43d0048aaeba304843b268c660598dfe9056656fc47e2b3035efb0221c54',
             'cc-by-2/train/out-000000.tar': '0e495f41871570fb08bc065103731774a1a4018a72630c086890759a2399cc18',
             'cc-by-2/train/out-000001.parquet': 'd09f6f30a5a89467b25af5d5cb63a2c745e3935300202b523813096407077095',
             'cc-by-2/train/out-000001.tar': 'bc26aa6d0d0f5eb94fdb9a4e4c309827d9535c43b828469b397b9d72e6a7255c',
             'cc-by-2/val/out-000000.parquet': 'cfb2a3860d101a278c30aec25862b15631c5353f5171ade19b5c32b88b6667cd',
             'cc-by-2/val/out-000000.tar': '8a9a655d16584507902443e9fedf91c104440dbb19f9518a3823450b34f8f69a',
             'cc-by-2/val/out-000001.parquet': '0e30ff8fe96d34df579e0c225887085ba91ef8a32051eeaed00b24c4655f1830',
             'cc-by-2/val/out-000001.tar': '1f8ae72bf336f458a0a949ccc6c7cd3b41042d9b2ee9205f5a9274ac78a11149',
             'cc-by-nc-sa-2/train/out-000000.parquet': 'b13599a969025e5cdf73d4b4f86094ff67454dcb5d97a851a7b5f2ee1e7f1f8f',
             'cc-by-nc-sa-2/train/out-000000.tar': 'd7f014e365136f908cbe4548ec08e7c8e2227391e543e9103e20929ed6e7bb61',
             'cc-by-nc-sa-2/train/out-000001.parquet': '45263af3b285424f7b9ec91073c1efcab9581932138eeb0766f17de13addd103',
             'cc-by-nc-sa-2/train/out-000001.tar': 'b7b90e0aa73ae1c7f3d66d1a56cf267115e6565dcf845f07cad9df7d97a547ce',
             'cc-by-nc-sa-2/train/out-000002.parquet': 'cc4d15ee62a4a95c2d669ebfbc27013a7e9c6f0f896325baee00c4360bebad2d',
             'cc-by-nc-sa-2/train/out-000002.tar': '1e5d700f50eca5f84ef35db64174fa0005d49793f406d0d90d4d60102c50ccfd',
             'cc-by-nc-sa-2/train/out-000003.parquet': '0749736b5ffac65d6b8fae499b2ee58c57b3971689ba1607d47b61aaaf162898',
             'cc-by-nc-sa-2/train/out-000003.tar': '8c3dddbcb5858589fa6e4bda3916ad22790c74a4be881ff01528558d79ed0bd1',
             'cc-by-nc-sa-2/val/out-000000.parquet': 'f12c83095225c76d17d43317aabb128c057540ae657577a5857d4b56ea131dbd',
             'cc-by-nc-sa-2/val/out-000000.tar': 'd258d9a440f455a7ba8fae785b45a980b03f846bd0c652e188db0490f2d26aa5',
             'manifest.json': '73c605d86eacd664d715e7ec61aebc96cf3f3443fc28b1e980e32f0fc5af7941',
             'metadata.json': 'b49c2da8f6d8cc0183527683d258d8376d7ed3c988f37c713c00b2096d4d3a89',
             'stats.json': 'dbfa50713b23dc4b2dfa620b82abc8d7e1b3fe444bd3fd407d1ce7d7b684811f'}}


@pytest.mark.slow
def test_outputs_are_byte_identical_to_the_base_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = _build_all(tmp_path)
    if os.environ.get("PRINT_GOLDEN"):
        import pprint
        pprint.pprint(found, width=120)
    assert found == GOLDEN
