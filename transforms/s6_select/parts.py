"""Body-part table of the DensePose CSE mesh `smpl_27554`: which parts each vertex belongs to.

The table is a uint32 array of shape (27554,): bit `PART_BITS[name]` is set when the vertex lies on
that part (a vertex on a boundary may be on two or three parts). It is built once from public
DensePose evaluation files (`python -m beam_jobs.part_table --output=DIR`) and saved as
`part_table.npy` in the model directory; the project ships no third-party data.

Sources, default (`build_from_densepose`): DensePose's own charts.
  * `SMPL_subdiv.mat`: `vertex` (3, N) positions, faces (M, 3, 1-based), `Part_ID_subdiv` (N,):
    one of 24 charts per vertex of the UV-subdivided SMPL mesh (vertices on chart seams repeat);
  * `SMPL_SUBDIV_TRANSFORM.mat`: `index` (N,), 1-based, the smpl_27554 id of each of those N.
  Chart -> part (DensePose data_format.md; "Left"/"Right" are the person's own sides, as COCO's):
  1,2 torso; 3 right hand; 4 left hand; 5 left foot; 6 right foot; 7,9 right upper leg;
  8,10 left upper leg; 11,13 right lower leg; 12,14 left lower leg; 15,17 left upper arm;
  16,18 right upper arm; 19,21 left lower arm; 20,22 right lower arm; 23,24 head.
  There is no neck chart: `neck` = torso vertices within a geodesic distance of the head charts
  (Dijkstra over mesh edges weighted by their length; default 5 % of the mesh height, about 8 cm on
  a 1.7 m body). The builder also records the mean x of the left and right charts: SMPL puts the
  person's left at +x, so `left_minus_right_x > 0` confirms the side convention on the real data.

Alternative (`build_from_meshcapade`): a user-supplied Meshcapade `smpl_vert_segmentation.json`
(24 named parts over the 6,890 SMPL vertex ids, 0-based). Lifted to 27,554 vertices assuming
smpl_27554 = SMPL subdivided once (6,890 originals first, then one midpoint per SMPL edge): vertex
i < 6890 keeps its parts; a midpoint takes the parts its edge's two endpoints share, or the union of
their parts when they share none (the midpoint then sits on the boundary of both). The edges come
from the DensePose faces above; the builder checks that every midpoint has exactly two original
neighbours and fails loudly if the real data says otherwise.
"""
from __future__ import annotations

import io
import json
import logging
from typing import Any, Mapping, Optional, Union

import numpy as np

from transforms.records import NUM_CSE_VERTICES

# The public inputs of the default table are the assets 'smpl_subdiv' and 'smpl_subdiv_transform'
# of transforms/assets.py (no checksums known offline: trust on first use there).
SUBDIV_ASSET = "smpl_subdiv"
SUBDIV_TRANSFORM_ASSET = "smpl_subdiv_transform"
PART_TABLE_FILENAME = "part_table.npy"

# Bit position of each part in the table (person's own left/right).
PART_NAMES = (
    "torso", "neck", "head",
    "left_upper_arm", "right_upper_arm", "left_lower_arm", "right_lower_arm",
    "left_hand", "right_hand",
    "left_upper_leg", "right_upper_leg", "left_lower_leg", "right_lower_leg",
    "left_foot", "right_foot",
)
PART_BITS = {name: index for index, name in enumerate(PART_NAMES)}


def part_mask(*names: str) -> int:
    """The bitmask with the bits of `names` set."""
    value = 0
    for name in names:
        value |= 1 << PART_BITS[name]
    return value


# DensePose chart id (1-based) -> part name.
DENSEPOSE_CHART_PARTS = {
    1: "torso", 2: "torso", 3: "right_hand", 4: "left_hand", 5: "left_foot", 6: "right_foot",
    7: "right_upper_leg", 9: "right_upper_leg", 8: "left_upper_leg", 10: "left_upper_leg",
    11: "right_lower_leg", 13: "right_lower_leg", 12: "left_lower_leg", 14: "left_lower_leg",
    15: "left_upper_arm", 17: "left_upper_arm", 16: "right_upper_arm", 18: "right_upper_arm",
    19: "left_lower_arm", 21: "left_lower_arm", 20: "right_lower_arm", 22: "right_lower_arm",
    23: "head", 24: "head",
}

# Meshcapade smpl_vert_segmentation.json part name -> our part name.
MESHCAPADE_PARTS = {
    "hips": "torso", "spine": "torso", "spine1": "torso", "spine2": "torso",
    "leftShoulder": "torso", "rightShoulder": "torso",  # clavicle region, on the torso surface
    "neck": "neck", "head": "head",
    "leftArm": "left_upper_arm", "rightArm": "right_upper_arm",
    "leftForeArm": "left_lower_arm", "rightForeArm": "right_lower_arm",
    "leftHand": "left_hand", "leftHandIndex1": "left_hand",
    "rightHand": "right_hand", "rightHandIndex1": "right_hand",
    "leftUpLeg": "left_upper_leg", "rightUpLeg": "right_upper_leg",
    "leftLeg": "left_lower_leg", "rightLeg": "right_lower_leg",
    "leftFoot": "left_foot", "leftToeBase": "left_foot",
    "rightFoot": "right_foot", "rightToeBase": "right_foot",
}
NUM_SMPL_VERTICES = 6890
DEFAULT_NECK_FRACTION = 0.05  # neck geodesic radius, as a fraction of the mesh height

_FACE_KEYS = ("faces", "face", "Faces", "All_Faces", "F")
_VERTEX_KEYS = ("vertex", "vertices", "Vertex", "V")


class PartTableError(ValueError):
    """The inputs do not describe the mesh the builder expects."""


def _first_key(mat: Mapping[str, Any], keys: tuple[str, ...], what: str) -> np.ndarray:
    for key in keys:
        if key in mat:
            return np.asarray(mat[key])
    found = sorted(k for k in mat if not k.startswith("__"))
    raise PartTableError(f"no {what} ({' / '.join(keys)}) in the .mat file; keys: {found}")


def load_mat(source: Union[str, bytes, Mapping[str, Any]]) -> Mapping[str, Any]:
    """A .mat file as a dict: from a path, raw bytes, or an already loaded dict."""
    from scipy.io import loadmat

    if isinstance(source, Mapping):
        return source
    if isinstance(source, bytes):
        return loadmat(io.BytesIO(source))
    return loadmat(source)


class SubdivMesh:
    """The smpl_27554 mesh as DensePose's evaluation files describe it, in 27,554-id space."""

    def __init__(self, subdiv: Mapping[str, Any], transform: Mapping[str, Any],
                 num_vertices: int = NUM_CSE_VERTICES):
        positions = _first_key(subdiv, _VERTEX_KEYS, "vertex positions").astype(np.float64)
        if positions.ndim != 2 or 3 not in positions.shape:
            raise PartTableError(f"vertex positions must be (3, N) or (N, 3), got {positions.shape}")
        if positions.shape[0] == 3 and positions.shape[1] != 3:
            positions = positions.T
        charts = np.asarray(subdiv["Part_ID_subdiv"]).reshape(-1).astype(np.int64)
        index = np.asarray(transform["index"]).reshape(-1).astype(np.int64) - 1  # 1-based
        faces = _first_key(subdiv, _FACE_KEYS, "faces").astype(np.int64)
        if faces.ndim != 2 or 3 not in faces.shape:
            raise PartTableError(f"faces must be (M, 3), got {faces.shape}")
        if faces.shape[1] != 3:
            faces = faces.T
        n_subdiv = positions.shape[0]
        if charts.shape[0] != n_subdiv or index.shape[0] != n_subdiv:
            raise PartTableError(
                f"{n_subdiv} vertices but {charts.shape[0]} chart ids and {index.shape[0]} transform ids")
        if faces.min() == 1 and faces.max() == n_subdiv:
            faces = faces - 1  # MATLAB, 1-based
        if faces.min() < 0 or faces.max() >= n_subdiv:
            raise PartTableError(f"face ids span {faces.min()}..{faces.max()} for {n_subdiv} vertices")
        if index.min() < 0 or index.max() >= num_vertices:
            raise PartTableError(f"transform ids span {index.min() + 1}..{index.max() + 1}, "
                                 f"expected 1..{num_vertices}")
        if np.unique(index).size != num_vertices:
            raise PartTableError(f"transform covers {np.unique(index).size} of {num_vertices} ids")
        if charts.min() < 1 or charts.max() > 24:
            raise PartTableError(f"chart ids span {charts.min()}..{charts.max()}, expected 1..24")
        self.num_vertices = num_vertices
        self.subdiv_to_id = index
        self.subdiv_charts = charts
        # Seam copies of one vertex share its position: average them.
        counts = np.bincount(index, minlength=num_vertices).astype(np.float64)
        self.positions = np.stack(
            [np.bincount(index, weights=positions[:, axis], minlength=num_vertices) / counts
             for axis in range(3)], axis=1)
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        edges = index[edges]
        edges = edges[edges[:, 0] != edges[:, 1]]
        edges.sort(axis=1)
        self.edges = np.unique(edges, axis=0)  # (E, 2) in 27,554-id space, a < b

    def chart_bits(self) -> np.ndarray:
        """Part bits from the DensePose charts (a vertex on a chart seam gets both charts' parts)."""
        chart_to_bits = np.zeros(25, np.uint32)
        for chart, name in DENSEPOSE_CHART_PARTS.items():
            chart_to_bits[chart] = np.uint32(1 << PART_BITS[name])
        table = np.zeros(self.num_vertices, np.uint32)
        np.bitwise_or.at(table, self.subdiv_to_id, chart_to_bits[self.subdiv_charts])
        return table

    def geodesic_distance_from(self, sources: np.ndarray) -> np.ndarray:
        """Shortest edge-path length from the nearest of `sources` (ids) to every vertex."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import dijkstra

        a, b = self.edges[:, 0], self.edges[:, 1]
        lengths = np.linalg.norm(self.positions[a] - self.positions[b], axis=1)
        lengths = np.maximum(lengths, 1e-12)  # a zero weight would read as "no edge"
        graph = coo_matrix((lengths, (a, b)), shape=(self.num_vertices,) * 2).tocsr()
        return dijkstra(graph, directed=False, indices=np.flatnonzero(sources), min_only=True)

    def height(self) -> float:
        return float(np.ptp(self.positions[:, 1]))


def add_neck(table: np.ndarray, mesh: SubdivMesh, neck_distance: float) -> np.ndarray:
    """Set the neck bit on torso vertices within `neck_distance` (mesh units) of a head vertex."""
    head = (table & part_mask("head")) != 0
    torso = (table & part_mask("torso")) != 0
    if not head.any():
        raise PartTableError("no head vertices: cannot derive the neck")
    distance = mesh.geodesic_distance_from(head)
    neck = torso & (distance <= neck_distance)
    out = table.copy()
    out[neck] |= np.uint32(part_mask("neck"))
    return out


def side_check(table: np.ndarray, mesh: SubdivMesh) -> dict[str, float]:
    """Mean x of the left-side and right-side parts (SMPL: person's left at +x)."""
    left = (table & np.uint32(sum(part_mask(n) for n in PART_NAMES if n.startswith("left_")))) != 0
    right = (table & np.uint32(sum(part_mask(n) for n in PART_NAMES if n.startswith("right_")))) != 0
    left_x = float(mesh.positions[left, 0].mean()) if left.any() else float("nan")
    right_x = float(mesh.positions[right, 0].mean()) if right.any() else float("nan")
    return {"left_mean_x": left_x, "right_mean_x": right_x, "left_minus_right_x": left_x - right_x}


def build_from_densepose(subdiv: Any, transform: Any, neck_distance: Optional[float] = None,
                         num_vertices: int = NUM_CSE_VERTICES) -> tuple[np.ndarray, dict[str, Any]]:
    """Part table from DensePose's charts, plus a neck band; returns (table, provenance info)."""
    mesh = SubdivMesh(load_mat(subdiv), load_mat(transform), num_vertices)
    if neck_distance is None:
        neck_distance = DEFAULT_NECK_FRACTION * mesh.height()
    table = add_neck(mesh.chart_bits(), mesh, neck_distance)
    info = {"source": "densepose_charts", "neck_distance": float(neck_distance),
            "mesh_height": mesh.height(), **side_check(table, mesh), **part_counts(table)}
    if info["left_minus_right_x"] < 0:
        logging.warning("left parts sit at -x on this mesh (%s): the side convention may be mirrored",
                        info)
    return table, info


def build_from_meshcapade(segmentation: Union[str, bytes, Mapping[str, list]], subdiv: Any,
                          transform: Any, num_vertices: int = NUM_CSE_VERTICES,
                          num_original: int = NUM_SMPL_VERTICES) -> tuple[np.ndarray, dict[str, Any]]:
    """Part table lifted from Meshcapade's 6,890-vertex segmentation (see the module docstring)."""
    if isinstance(segmentation, (str, bytes)):
        segmentation = json.loads(segmentation)
    unknown = sorted(set(segmentation) - set(MESHCAPADE_PARTS))
    if unknown:
        raise PartTableError(f"unknown Meshcapade part names: {unknown}")
    original = np.zeros(num_original, np.uint32)
    for name, ids in segmentation.items():
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_original):
            raise PartTableError(f"part {name} has ids outside 0..{num_original - 1}")
        original[ids] |= np.uint32(part_mask(MESHCAPADE_PARTS[name]))
    mesh = SubdivMesh(load_mat(subdiv), load_mat(transform), num_vertices)
    # Each midpoint's two neighbours among the original vertices are its edge's endpoints.
    edges = mesh.edges
    cross = edges[(edges[:, 0] < num_original) & (edges[:, 1] >= num_original)]
    order = np.argsort(cross[:, 1], kind="stable")
    cross = cross[order]
    per_midpoint = np.bincount(cross[:, 1] - num_original, minlength=num_vertices - num_original)
    if not (per_midpoint == 2).all():
        bad = int((per_midpoint != 2).sum())
        raise PartTableError(
            f"{bad} of {num_vertices - num_original} vertices >= {num_original} do not have exactly two "
            "original neighbours: this mesh is not 'SMPL originals first, then edge midpoints'")
    endpoints = cross[:, 0].reshape(-1, 2)  # sorted by midpoint id, two rows each
    first, second = original[endpoints[:, 0]], original[endpoints[:, 1]]
    shared = first & second
    midpoints = np.where(shared != 0, shared, first | second)
    table = np.concatenate([original, midpoints]).astype(np.uint32)
    info = {"source": "meshcapade_lifted", **side_check(table, mesh), **part_counts(table)}
    return table, info


def part_counts(table: np.ndarray) -> dict[str, int]:
    """Number of vertices on each part, e.g. {'count_head': 1234, ...}, plus unlabelled ones."""
    counts = {f"count_{name}": int(((table >> np.uint32(bit)) & 1).sum())
              for name, bit in PART_BITS.items()}
    counts["count_unlabelled"] = int((table == 0).sum())
    return counts


def validate_table(table: np.ndarray, num_vertices: int = NUM_CSE_VERTICES) -> np.ndarray:
    """Check a loaded table's shape and dtype; returns it as uint32."""
    table = np.asarray(table)
    if table.shape != (num_vertices,) or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"part table must be an integer array of shape ({num_vertices},), "
                         f"got {table.dtype} {table.shape}")
    if int(table.max(initial=0)) >= (1 << len(PART_NAMES)):
        raise ValueError("part table has bits beyond the known parts")
    return table.astype(np.uint32, copy=False)


def load_part_table(path: str, num_vertices: int = NUM_CSE_VERTICES) -> np.ndarray:
    """Read a part table .npy through Beam's FileSystems (local paths and gs:// alike)."""
    from apache_beam.io.filesystems import FileSystems

    if not path.endswith(".npy"):
        path = path.rstrip("/") + "/" + PART_TABLE_FILENAME
    with FileSystems.open(path) as handle:
        table = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    return validate_table(table, num_vertices)


def save_part_table(table: np.ndarray, output_dir: str, info: Optional[dict[str, Any]] = None) -> str:
    """Write part_table.npy (and part_table.json with the part names and provenance)."""
    from apache_beam.io.filesystems import FileSystems

    buffer = io.BytesIO()
    np.save(buffer, validate_table(table, table.shape[0]), allow_pickle=False)
    path = output_dir.rstrip("/") + "/" + PART_TABLE_FILENAME
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())
    sidecar = {"part_bits": PART_BITS, **(info or {})}
    with FileSystems.create(path[:-4] + ".json") as handle:
        handle.write(json.dumps(sidecar, indent=2, sort_keys=True).encode("utf-8"))
    return path
