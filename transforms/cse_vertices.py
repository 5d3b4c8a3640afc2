"""CSE embeddings -> SMPL mesh vertex ids: the nearest `embed_map` row of each embedding.

Shared by the annotate stage (DensePose CSE output -> `Detections.vertices`) and its tests; it
lives below the stages so that no stage imports a later one.
"""
from __future__ import annotations

from typing import Any, Optional

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
