"""Part-table builders on small synthetic meshes whose right labels are known by construction."""
import json

import numpy as np
import pytest
from scipy.io import savemat

from beam_jobs import part_table as part_table_job
from transforms.s6_select import parts
from transforms.s6_select.parts import PART_BITS, PartTableError, part_mask


def grid_mesh(rows, cols, spacing=0.1):
    """Vertices of a rows x cols grid (row 0 at the top, y = -row * spacing) and its triangles."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    positions = np.stack([c.ravel() * spacing, -r.ravel() * spacing, np.zeros(r.size)], 1)
    faces = []
    for i in range(rows - 1):
        for j in range(cols - 1):
            v = i * cols + j
            faces += [(v, v + 1, v + cols), (v + 1, v + cols + 1, v + cols)]
    return positions, np.array(faces)


def seam_body(rows=12, cols=4, head_rows=4, spacing=0.1, hands=True):
    """A grid body: head chart (23) on rows [0, head_rows), torso chart (2) below; the seam row
    head_rows - 1 is stored twice (once per chart), as DensePose stores chart seams. Optionally a
    left-hand triangle (chart 4) at +x and a right-hand one (chart 3) at -x. Subdiv vertices are
    shuffled so the transform must be used. Returns (subdiv dict, transform dict, ids info)."""
    positions, faces = grid_mesh(rows, cols, spacing)
    seam = head_rows - 1
    head_v = np.arange(0, head_rows * cols)
    torso_v = np.arange(seam * cols, rows * cols)
    # subdiv vertex list: head copies then torso copies; ids = grid vertex ids
    ids = np.concatenate([head_v, torso_v])
    charts = np.concatenate([np.full(head_v.size, 23), np.full(torso_v.size, 2)])
    sub_pos = positions[ids]
    local = {("h", int(v)): k for k, v in enumerate(head_v)}
    local.update({("t", int(v)): head_v.size + k for k, v in enumerate(torso_v)})
    sub_faces = []
    for f in faces:
        part = "h" if max(f) < head_rows * cols else "t"
        sub_faces.append([local[(part, int(v))] for v in f])
    n_ids = rows * cols
    if hands:
        for chart, x in ((4, 10.0), (3, -10.0)):
            base = len(ids)
            tri = np.array([[x, 0, 0], [x + 0.1, 0, 0], [x, -0.1, 0]])
            sub_pos = np.concatenate([sub_pos, tri])
            ids = np.concatenate([ids, n_ids + np.arange(3)])
            charts = np.concatenate([charts, [chart] * 3])
            sub_faces.append([base, base + 1, base + 2])
            n_ids += 3
    perm = np.random.default_rng(0).permutation(len(ids))
    inverse = np.argsort(perm)
    subdiv = {"vertex": sub_pos[perm].T, "faces": inverse[np.array(sub_faces)] + 1,
              "Part_ID_subdiv": charts[perm][:, None]}
    transform = {"index": (ids[perm] + 1)[:, None]}
    return subdiv, transform, n_ids


def test_densepose_charts_seams_and_neck_band(tmp_path):
    subdiv, transform, n = seam_body()
    savemat(tmp_path / "s.mat", subdiv)
    savemat(tmp_path / "t.mat", transform)
    table, info = parts.build_from_densepose(str(tmp_path / "s.mat"), str(tmp_path / "t.mat"),
                                             neck_distance=0.15, num_vertices=n)
    cols = 4
    row = lambda r: table[r * cols:(r + 1) * cols]  # noqa: E731
    head, torso, neck = part_mask("head"), part_mask("torso"), part_mask("neck")
    assert (row(0) == head).all() and (row(2) == head).all()
    assert (row(3) == head | torso | neck).all()  # the seam: both charts, distance 0 from the head
    assert (row(4) == torso | neck).all()  # 0.1 below the head
    assert (row(5) == torso).all()  # 0.2 below: outside the 0.15 band
    assert table[48] == part_mask("left_hand") and table[51] == part_mask("right_hand")
    assert info["left_minus_right_x"] > 0
    assert info["count_neck"] == 8 and info["count_unlabelled"] == 0


def test_default_neck_distance_is_a_fraction_of_the_height():
    subdiv, transform, n = seam_body(rows=41, hands=False)  # height 4.0 -> neck radius 0.2
    table, info = parts.build_from_densepose(subdiv, transform, num_vertices=n)
    assert info["neck_distance"] == pytest.approx(0.2)
    assert info["count_neck"] == 3 * 4  # rows 3, 4, 5


def test_bad_inputs_raise_clear_errors():
    subdiv, transform, n = seam_body()
    with pytest.raises(PartTableError, match="covers"):
        parts.build_from_densepose(subdiv, transform, num_vertices=n + 5)
    broken = dict(subdiv)
    del broken["faces"]
    with pytest.raises(PartTableError, match="no faces"):
        parts.build_from_densepose(broken, transform, num_vertices=n)


def subdivided_square():
    """Two triangles (0,1,2), (0,2,3) subdivided 1-to-4: originals 0-3, midpoints 4-8."""
    originals = np.array([[0, 0, 0], [1, 0, 0], [1, -1, 0], [0, -1, 0]], float)
    edges = [(0, 1), (1, 2), (0, 2), (2, 3), (0, 3)]
    mid = {e: 4 + k for k, e in enumerate(edges)}
    positions = np.concatenate([originals, [(originals[a] + originals[b]) / 2 for a, b in edges]])
    m = lambda a, b: mid[(min(a, b), max(a, b))]  # noqa: E731
    faces = []
    for a, b, c in [(0, 1, 2), (0, 2, 3)]:
        faces += [(a, m(a, b), m(c, a)), (m(a, b), b, m(b, c)), (m(c, a), m(b, c), c),
                  (m(a, b), m(b, c), m(c, a))]
    subdiv = {"vertex": positions.T, "faces": np.array(faces) + 1,
              "Part_ID_subdiv": np.full((9, 1), 2)}
    return subdiv, {"index": np.arange(1, 10)[:, None]}, edges


def test_meshcapade_lift_keeps_originals_and_gives_midpoints_shared_or_union_parts():
    subdiv, transform, edges = subdivided_square()
    segmentation = {"head": [0, 1], "neck": [1, 2], "spine2": [3]}
    table, info = parts.build_from_meshcapade(json.dumps(segmentation), subdiv, transform,
                                              num_vertices=9, num_original=4)
    head, neck, torso = part_mask("head"), part_mask("neck"), part_mask("torso")
    np.testing.assert_array_equal(table[:4], [head, head | neck, neck, torso])
    expected = {(0, 1): head, (1, 2): neck, (0, 2): head | neck, (2, 3): neck | torso, (0, 3): head | torso}
    for k, edge in enumerate(edges):
        assert table[4 + k] == expected[edge], edge


def test_meshcapade_lift_refuses_a_mesh_that_is_not_originals_then_midpoints():
    subdiv, transform, _ = subdivided_square()
    with pytest.raises(PartTableError, match="exactly two"):
        parts.build_from_meshcapade({"head": [0]}, subdiv, transform, num_vertices=9, num_original=5)
    with pytest.raises(PartTableError, match="unknown Meshcapade"):
        parts.build_from_meshcapade({"tail": [0]}, subdiv, transform, num_vertices=9, num_original=4)


def test_cli_builds_a_full_size_table_from_local_files(tmp_path):
    # 46 x 599 = 27,554 vertices: the real table's size, so the saved file loads as a real one.
    subdiv, transform, n = seam_body(rows=46, cols=599, head_rows=6, hands=False, spacing=0.01)
    assert n == 27554
    savemat(tmp_path / "SMPL_subdiv.mat", subdiv)
    savemat(tmp_path / "SMPL_SUBDIV_TRANSFORM.mat", transform)
    out = tmp_path / "model"
    part_table_job.run([f"--output={out}", f"--subdiv={tmp_path / 'SMPL_subdiv.mat'}",
                        f"--transform={tmp_path / 'SMPL_SUBDIV_TRANSFORM.mat'}",
                        "--neck_distance=0.015"])
    table = parts.load_part_table(str(out))
    assert table.shape == (27554,) and table.dtype == np.uint32
    assert (table[:5 * 599] == part_mask("head")).all()
    assert (table[6 * 599:7 * 599] == part_mask("torso") | part_mask("neck")).all()
    assert (table[7 * 599:] == part_mask("torso")).all()
    sidecar = json.loads((out / "part_table.json").read_text())
    assert sidecar["part_bits"] == PART_BITS
    assert len(sidecar["inputs"]["subdiv"]["sha256"]) == 64
