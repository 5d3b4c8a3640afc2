"""Export to FDH's own layout (issue 12, item 6), loaded the way DP2 loads FDH.

DP2's loader steps (dp2/data/datasets/fdh.py get_dataloader_fdh_wds, dp2/data/utils.py decoders
and collate_fn, dp2/data/transforms CreateEmbedding) are restated here from their description on
top of the real webdataset pipeline: shard list from a brace pattern under the root, tar to
samples, per-extension decoders (PNG -> uint8 CHW, masks -> bool (1, H, W) via > 0, keypoints ->
float32 with visibility = (v > 0) and inside [0, 1], vertices -> int32 (1, H, W)), batching,
key renames (img, mask, keypoints, maskrcnn_mask, __key__, + vertices and E_mask with
load_embedding), and embed_map[vertices] * E_mask -> (B, 16, H, W).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from beam_jobs import export
from dataset.export import export_fdh_layout, sample_tar_bytes
from dataset.shards import read_parquet_rows, read_tar_shard
from tests.jobs_dataset import LAYOUT, pristine  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
wds = pytest.importorskip("webdataset")

FDH_FOUR = ["cc-by-2", "cc-by-sa-2", "cc-by-nc-2", "cc-by-nc-sa-2"]


def _png(data):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.rollaxis(np.array(image.convert("RGB")), 2))


def _mask(data):
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).squeeze()[None] > 0


def _keypoints(data):
    keypoints = torch.from_numpy(np.load(io.BytesIO(data))).float()
    outside = ((keypoints[:, 0] < 0) | (keypoints[:, 0] > 1) | (keypoints[:, 1] < 0) | (keypoints[:, 1] > 1))
    keypoints[:, 2] = ((keypoints[:, 2] > 0) & ~outside).float()
    return keypoints


def _vertices(data):
    return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.int32)).squeeze()[None]


def _collate(batch):
    from torch.utils.data import default_collate

    return {key: default_collate([d[key] for d in batch]) for key in batch[0]}


def dp2_batches(root, split: str, count: int, load_embedding: bool, batch_size: int = 3):
    """DP2's FDH loader pipeline, restated (finite, unshuffled: its val settings)."""
    decoders = [wds.handle_extension("image.png", _png), wds.handle_extension("mask.png", _mask),
                wds.handle_extension("maskrcnn_mask.png", _mask),
                wds.handle_extension("keypoints.npy", _keypoints)]
    renames = [["img", "image.png"], ["mask", "mask.png"], ["keypoints", "keypoints.npy"],
               ["maskrcnn_mask", "maskrcnn_mask.png"], ["__key__", "__key__"]]
    if load_embedding:
        decoders += [wds.handle_extension("vertices.npy", _vertices), wds.handle_extension("E_mask.png", _mask)]
        renames += [["vertices", "vertices.npy"], ["E_mask", "e_mask.png"]]
    path = f"{root}/{split}/out-{{000000..{count - 1:06d}}}.tar"
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(path), wds.tarfile_to_samples(), wds.decode(*decoders),
        wds.batched(batch_size, collation_fn=_collate, partial=True), wds.rename_keys(*renames))
    return list(pipeline)


@pytest.fixture(scope="module")
def exported(pristine, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "fdh"
    manifest = export.run([f"--dataset={pristine}", f"--licenses={','.join(FDH_FOUR)}", f"--output={out}",
                           "--max_samples=2"])
    return out, manifest


def test_layout_numbering_parquet_metadata_and_manifest(exported, pristine):  # noqa: F811
    out, manifest = exported
    expected = {split: sum(n for _, n, _, lic, s in LAYOUT if s == split and lic in FDH_FOUR)
                for split in ("train", "val")}
    for split, samples in expected.items():
        entries = [e for e in manifest["shards"] if e["split"] == split]
        # contiguous numbering from 000000 across the licences, at most 2 samples per shard
        assert [e["path"] for e in entries] == [f"{split}/out-{i:06d}.tar" for i in range(len(entries))]
        assert sum(e["samples"] for e in entries) == samples and all(e["samples"] <= 2 for e in entries)
        assert len(entries) == -(-samples // 2)
        for entry in entries:
            keys = [m["__key__"] for m in read_tar_shard(str(out / entry["path"]))]
            rows = read_parquet_rows(str(out / entry["parquet"]))
            assert [r["key"] for r in rows] == keys and {r["shard"] for r in rows} == {entry["path"]}
            assert all(int(key) > 0 for key in keys)  # FDH's int(key)
    # licence order as given: cc-by-2's train samples come first
    first = read_parquet_rows(str(out / "train/out-000000.parquet"))
    assert {r["license"] for r in first} == {"Attribution License"}
    assert manifest["shards"][0]["licenses"] == ["cc-by-2"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert len(metadata) == sum(expected.values()) == manifest["samples"]
    source = json.loads((pristine / "metadata.json").read_text())
    assert all(metadata[key] == source[key] for key in metadata)
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_members_are_copied_byte_for_byte(exported, pristine):  # noqa: F811
    out, manifest = exported
    source = {}
    for path in sorted(pristine.glob("*/*/out-*.tar")):
        source.update({m["__key__"]: m for m in read_tar_shard(str(path))})
    for entry in manifest["shards"]:
        for members in read_tar_shard(str(out / entry["path"])):
            assert members == source[members["__key__"]]


@pytest.mark.parametrize("load_embedding", [True, False])
def test_dp2_loader_reads_the_export(exported, load_embedding):
    out, manifest = exported
    embed_map = torch.randn(27554, 16)
    for split in ("train", "val"):
        count = sum(1 for e in manifest["shards"] if e["split"] == split)
        batches = dp2_batches(out, split, count, load_embedding)
        assert sum(len(b["__key__"]) for b in batches) == sum(
            e["samples"] for e in manifest["shards"] if e["split"] == split)
        for batch in batches:
            n = len(batch["__key__"])
            assert batch["img"].dtype == torch.uint8 and batch["img"].shape == (n, 3, 288, 160)
            for name in ("mask", "maskrcnn_mask"):
                assert batch[name].dtype == torch.bool and batch[name].shape == (n, 1, 288, 160)
            assert (batch["mask"] <= batch["maskrcnn_mask"]).all()  # dilated person covers the person
            keypoints = batch["keypoints"]
            assert keypoints.dtype == torch.float32 and keypoints.shape == (n, 17, 3)
            visible = keypoints[..., 2] > 0
            assert set(keypoints[..., 2].unique().tolist()) <= {0.0, 1.0}
            assert ((keypoints[..., :2] >= 0) & (keypoints[..., :2] <= 1)).all(-1)[visible].all()
            if not load_embedding:
                assert "vertices" not in batch and "E_mask" not in batch
                continue
            vertices, e_mask = batch["vertices"], batch["E_mask"]
            assert vertices.dtype == torch.int32 and vertices.shape == (n, 1, 288, 160)
            assert e_mask.dtype == torch.bool and e_mask.shape == (n, 1, 288, 160)
            assert vertices.min() >= 0 and vertices.max() < 27554 and not vertices[~e_mask].any()
            embedding = embed_map[vertices.long()].squeeze(dim=1).permute(0, 3, 1, 2) * e_mask
            assert embedding.shape == (n, 16, 288, 160)


def test_byte_cap_rolls_shards(pristine, tmp_path):  # noqa: F811
    one = next(read_tar_shard(str(sorted(pristine.glob("cc-by-2/train/out-*.tar"))[0])))
    size = sample_tar_bytes(one)
    manifest = export_fdh_layout(str(pristine), ["cc-by-2"], str(tmp_path / "fdh"),
                                 max_samples=3000, max_bytes=size + size // 2)
    assert all(e["samples"] == 1 for e in manifest["shards"])
    # the tar holds exactly the counted bytes plus tarfile's end-of-archive padding
    assert all(e["bytes"] >= size for e in manifest["shards"])


def test_user_errors_are_clear(pristine, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="not in"):
        export_fdh_layout(str(pristine), ["cc-by-nd-2"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="differ"):
        export_fdh_layout(str(pristine), ["cc-by-2"], str(pristine))
    export_fdh_layout(str(pristine), ["cc-by-2"], str(tmp_path / "y"))
    with pytest.raises(ValueError, match="already holds"):
        export_fdh_layout(str(pristine), ["cc-by-2"], str(tmp_path / "y"))
