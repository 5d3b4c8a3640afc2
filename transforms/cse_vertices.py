"""CSE embeddings -> SMPL mesh vertex ids (the nearest `embed_map` row of each embedding), and
DP2's mapping of a CSE detection into image and crop coordinates.

Shared by the annotate stage (DensePose CSE output -> `Detections.vertices`) and its tests; it
lives below the stages so that no stage imports a later one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

DEFAULT_CHUNK_ROWS = 1024  # embeddings per distance block: 1024 x 27554 float32 = 113 MB

def _is_torch(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "torch"


def embeddings_to_vertices(embeddings: Any, embed_map: Any, mask: Any = None,
                           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Any:
    """Index of the nearest `embed_map` row (squared L2) for each CSE embedding.

    `embeddings` is either a per-pixel map (C, h, w) -> returns (h, w), or rows (n, C) -> (n,).
    `embed_map` is (V, C) (V = 27,554 for smpl_27554, C = 16). `mask` (h, w) or (n,) bool keeps
    only those positions; the others get vertex 0 (as DensePose/DP2 do outside the CSE mask).
    Works on NumPy arrays (returns int64 NumPy) and on torch tensors (returns int64 tensor on the
    embeddings' device: pass CUDA tensors to run on the GPU). Distances are computed in blocks of
    `chunk_rows` embeddings so memory stays at chunk_rows * V floats.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    torch_mode = _is_torch(embeddings)
    if embeddings.ndim == 3:
        channels, height, width = embeddings.shape
        out_shape: tuple[int, ...] = (height, width)
        rows = embeddings.reshape(channels, -1).T  # (h*w, C) view
    elif embeddings.ndim == 2:
        channels = embeddings.shape[1]
        out_shape = (embeddings.shape[0],)
        rows = embeddings
    else:
        raise ValueError(f"embeddings must be (C, h, w) or (n, C), got shape {tuple(embeddings.shape)}")
    if embed_map.ndim != 2 or embed_map.shape[1] != channels:
        raise ValueError(f"embed_map must be (V, {channels}), got {tuple(embed_map.shape)}")
    if mask is not None and tuple(mask.shape) != out_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {out_shape}")
    if torch_mode:
        return _nearest_rows_torch(rows, embed_map, mask, out_shape, chunk_rows)
    return _nearest_rows_numpy(np.asarray(rows), np.asarray(embed_map), mask, out_shape, chunk_rows)


def _nearest_rows_numpy(rows: np.ndarray, embed_map: np.ndarray, mask: Optional[np.ndarray],
                        out_shape: tuple[int, ...], chunk_rows: int) -> np.ndarray:
    out = np.zeros(int(np.prod(out_shape)), np.int64)
    selected = np.flatnonzero(np.asarray(mask).reshape(-1)) if mask is not None else None
    if selected is not None:
        rows = rows[selected]
    rows = rows.astype(np.float32, copy=False)
    table = embed_map.astype(np.float32, copy=False)
    table_t = np.ascontiguousarray(table.T)
    table_sq = np.einsum("vc,vc->v", table, table)
    found = np.empty(rows.shape[0], np.int64)
    for start in range(0, rows.shape[0], chunk_rows):
        block = rows[start:start + chunk_rows]
        # ||e - m||^2 = ||e||^2 - 2 e.m + ||m||^2; ||e||^2 does not change the argmin.
        dist = block @ table_t
        dist *= -2.0
        dist += table_sq
        found[start:start + block.shape[0]] = dist.argmin(axis=1)
    if selected is None:
        out[:] = found
    else:
        out[selected] = found
    return out.reshape(out_shape)


def _nearest_rows_torch(rows, embed_map, mask, out_shape, chunk_rows):
    import torch

    device = rows.device
    out = torch.zeros(int(np.prod(out_shape)), dtype=torch.int64, device=device)
    selected = None
    if mask is not None:
        selected = torch.as_tensor(mask, device=device).reshape(-1).nonzero().squeeze(1)
        rows = rows[selected]
    rows = rows.float()
    table = torch.as_tensor(embed_map, device=device).float()
    table_t = table.T.contiguous()
    table_sq = (table * table).sum(dim=1)
    found = torch.empty(rows.shape[0], dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk_rows):
            block = rows[start:start + chunk_rows]
            dist = torch.addmm(table_sq, block, table_t, beta=1.0, alpha=-2.0)
            found[start:start + block.shape[0]] = dist.argmin(dim=1)
    if selected is None:
        out[:] = found
    else:
        out[selected] = found
    return out.reshape(out_shape)


# --------------------------------------------------------------------------------------------
# DensePose CSE output of one detection, and DP2's mapping of it into crop / image coordinates
# --------------------------------------------------------------------------------------------

@dataclass
class CseEmbedding:
    """One CSE detection in DensePose's box frame, kept so the crop stage can map it as DP2 does.

    `segm`: bool (h, w), the argmax of the coarse segmentation (True = person), h = w = 112;
    `embedding`: float32 (C, h, w); `box`: int (4,) x0, y0, x1, y1, the rounded detector box in
    image pixels that the box frame covers; `embed_map`: float32 (V, C) (shared by all detections
    of a photo: pickled once per element).
    """

    segm: np.ndarray
    embedding: np.ndarray
    box: np.ndarray
    embed_map: np.ndarray


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel of a nearest resize, as PyTorch / torchvision NEAREST
    computes it: floor(dst * scale) in float32, scale = float32(in / out), capped at in - 1."""
    scale = np.float32(size_in / size_out)
    found = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return found.clip(0, size_in - 1)


def segm_to_image_mask(segm: np.ndarray, box: Sequence[int], image_hw: tuple[int, int]) -> np.ndarray:
    """DP2's image-space CSE mask (cse_det_to_global): the box-frame argmax nearest-resized to the
    box, pasted into an (H, W) bool image; the part of the box outside the image is cut off."""
    height, width = image_hw
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.zeros((height, width), bool)
    if x1 <= x0 or y1 <= y0:
        return out
    rows = nearest_indices(segm.shape[0], y1 - y0)
    cols = nearest_indices(segm.shape[1], x1 - x0)
    resized = np.asarray(segm, bool)[rows[:, None], cols[None, :]]
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0:cy1, cx0:cx1] = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def box_in_crop(box: Sequence[float], crop_box: Sequence[int], out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image-pixel box lands in crop pixels (DP2 transform_embedding: each side
    round((v - crop_start) / crop_size * out_size)); x0, y0, x1, y1, may leave [0, out)."""
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    out_h, out_w = out_hw

    def to_crop(value, start, end, size):
        return int(np.round((float(value) - start) / (end - start) * size))

    return (to_crop(box[0], cx0, cx1, out_w), to_crop(box[1], cy0, cy1, out_h),
            to_crop(box[2], cx0, cx1, out_w), to_crop(box[3], cy0, cy1, out_h))


def _bilinear_antialias(array: np.ndarray, size_hw: tuple[int, int]):
    """(C, h, w) float -> (C, H, W) float32 torch tensor, bilinear with antialias (torchvision's
    resize of a tensor, as DP2 calls it)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None]
    return F.interpolate(tensor, size=size_hw, mode="bilinear", align_corners=False, antialias=True)[0]


def cse_to_crop(cse: CseEmbedding, crop_box: Sequence[int], out_hw: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(e_mask bool (H, W), vertices int64 (H, W)) of a CSE detection in a crop, as DP2 builds
    them (detection/utils.py transform_embedding + structures.py pre_process): E and the argmax S
    are resized bilinear with antialias straight from the box frame into the box's place in crop
    coordinates; e_mask = resized S > 0; vertices = the nearest embed_map row of the resized E per
    e_mask pixel, 0 elsewhere. Parts of the box outside the crop are cut off."""
    out_h, out_w = out_hw
    e_mask = np.zeros(out_hw, bool)
    vertices = np.zeros(out_hw, np.int64)
    x0, y0, x1, y1 = box_in_crop(cse.box, crop_box, out_hw)
    if x1 <= x0 or y1 <= y0:
        return e_mask, vertices
    size = (y1 - y0, x1 - x0)
    embedding = _bilinear_antialias(cse.embedding, size)
    segm = _bilinear_antialias(np.asarray(cse.segm, np.float32)[None], size)[0] > 0
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, out_h), min(x1, out_w)
    if cy1 <= cy0 or cx1 <= cx0:
        return e_mask, vertices
    inside = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    mask = segm[inside]
    found = embeddings_to_vertices(embedding[:, inside[0], inside[1]], cse.embed_map, mask=mask)
    e_mask[cy0:cy1, cx0:cx1] = mask.numpy()
    vertices[cy0:cy1, cx0:cx1] = found.numpy()
    return e_mask, vertices
