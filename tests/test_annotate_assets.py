"""The asset registry: verified downloads from a loopback HTTP server, model_dir resolution,
lock files (trust on first use), safe loading (weights_only torch.load, numpy-only unpickler)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pickle
import socket
import threading

import numpy as np
import pytest
import torch

from beam_jobs import assets as assets_cli
from transforms import assets
from transforms.assets import Asset
from tests.conftest import exit_status

PAYLOAD = b"fake weights " * 1000
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A loopback HTTP server serving a directory; yields (base_url, directory)."""
    root = tmp_path_factory.mktemp("served")
    (root / "good.bin").write_bytes(PAYLOAD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()


@pytest.fixture
def registry(monkeypatch, server, tmp_path):
    """Replace the registry with test assets served from loopback; the cache in tmp_path."""
    base, _ = server
    test_assets = [
        Asset("exact", base + "good.bin", "exact.bin", sha256=DIGEST),
        Asset("prefix", base + "good.bin", "prefix-abc.bin", sha256_prefix=DIGEST[:8]),
        Asset("wrong", base + "good.bin", "wrong.bin", sha256="0" * 64),
        Asset("tofu", base + "good.bin", "tofu.bin"),
        Asset("absent", base + "missing.bin", "absent.bin", sha256=DIGEST),
    ]
    monkeypatch.setattr(assets, "ASSETS", test_assets)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return test_assets


def test_fetch_verifies_exact_and_prefix_checksums(registry, tmp_path):
    paths = assets.fetch(["exact", "prefix"], str(tmp_path / "models"))
    for path in paths.values():
        assert open(path, "rb").read() == PAYLOAD
    assert assets.read_lock(str(tmp_path / "models")) == {}  # published checksums need no lock


def test_checksum_mismatch_raises_and_leaves_no_file(registry, tmp_path):
    model_dir = tmp_path / "models"
    with pytest.raises(assets.ChecksumMismatchError, match="wrong.bin"):
        assets.fetch(["wrong"], str(model_dir))
    assert not (model_dir / "wrong.bin").exists()
    assert not [name for name in os.listdir(model_dir) if name.startswith("wrong")]


def test_trust_on_first_use_records_then_enforces(registry, tmp_path):
    model_dir = str(tmp_path / "models")
    assets.fetch(["tofu"], model_dir)
    assert assets.read_lock(model_dir) == {"tofu": DIGEST}
    assert assets.resolve("tofu", model_dir) == os.path.join(model_dir, "tofu.bin")
    with open(os.path.join(model_dir, "tofu.bin"), "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(assets.ChecksumMismatchError, match="lock file"):
        assets.resolve("tofu", model_dir)
    assert exit_status(assets_cli.main, ["verify", f"--model_dir={model_dir}", "--names=tofu"]) == 2


def test_resolve_in_model_dir_and_missing_file_message(registry, tmp_path):
    model_dir = str(tmp_path / "models")
    with pytest.raises(assets.AssetMissingError) as error:
        assets.resolve("exact", model_dir)
    assert "exact.bin" in str(error.value) and "beam_jobs.assets fetch" in str(error.value)
    assets.fetch(["exact"], model_dir)
    assert assets.resolve("exact", model_dir) == os.path.join(model_dir, "exact.bin")


def test_model_dir_none_downloads_into_the_cache(registry, tmp_path):
    path = assets.resolve("prefix")  # model_dir=None: cache dir, downloaded from loopback
    assert path.startswith(str(tmp_path / "cache")) and open(path, "rb").read() == PAYLOAD


def test_model_dir_none_offline_gives_a_clear_error(registry, monkeypatch, tmp_path):
    with socket.socket() as probe:  # a loopback port nobody listens on: "offline"
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(assets, "ASSETS", [Asset("offline", f"http://127.0.0.1:{closed_port}/w.pth",
                                                 "w-12345678.pth", sha256_prefix="12345678")])
    with pytest.raises(assets.AssetMissingError) as error:
        assets.resolve("offline", timeout_s=2, retries=0)
    message = str(error.value)
    assert "w-12345678.pth" in message and "python -m beam_jobs.assets fetch" in message
    with pytest.raises(assets.AssetMissingError):
        assets.resolve("offline", download=False)


def test_http_404_is_an_error(registry, tmp_path):
    with pytest.raises(assets.AssetError, match="404"):
        assets.fetch(["absent"], str(tmp_path / "models"))


def test_cli_list_fetch_verify(registry, tmp_path, capsys):
    model_dir = str(tmp_path / "models")
    assert exit_status(assets_cli.main, ["list"]) == 0
    assert "exact.bin" in capsys.readouterr().out
    assert exit_status(assets_cli.main, ["verify", f"--model_dir={model_dir}", "--names=exact"]) == 2
    assert capsys.readouterr().err.startswith("MISSING\texact\t")
    assert exit_status(assets_cli.main, ["fetch", f"--model_dir={model_dir}", "--names=exact,tofu"]) == 0
    assert exit_status(assets_cli.main, ["verify", f"--model_dir={model_dir}", "--names=exact,tofu"]) == 0
    assert json.load(open(os.path.join(model_dir, assets.LOCK_FILE))) == {"tofu": DIGEST}


def test_real_registry_is_consistent():
    real = assets.registry()
    assert {"keypointrcnn_resnet50_fpn_coco", "maskrcnn_resnet50_fpn_v2_coco",
            "densepose_rcnn_R_101_FPN_DL_soft_s1x", "phi_smpl_27554_256"} <= set(real)
    for asset in real.values():
        assert asset.url.startswith("https://") and asset.filename and "/" not in asset.filename
        if asset.sha256_prefix:  # torchvision: the prefix is the hash in the file name
            assert asset.filename.rsplit(".", 1)[0].endswith("-" + asset.sha256_prefix)


def test_weights_only_load_refuses_arbitrary_objects(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(assets.load_torch_state_dict(str(good))["w"], torch.ones(2))
    bad = tmp_path / "bad.pth"
    torch.save({"w": Asset("x", "u", "f")}, bad)  # an arbitrary class instance
    with pytest.raises(pickle.UnpicklingError):
        assets.load_torch_state_dict(str(bad))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_unpickle_allows_numpy_and_refuses_code(tmp_path):
    data = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "__author__": "test"}
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(data))
    loaded = assets.safe_unpickle(str(good))
    np.testing.assert_array_equal(loaded["model"]["w"], data["model"]["w"])
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        assets.safe_unpickle(str(bad))


# --- a model dir in one command: the part table built from the .mat assets ---------------------

@pytest.fixture(scope="module")
def mesh_files(server):
    """Full-size synthetic SMPL_subdiv / transform .mat files (27,554 ids) on the loopback server."""
    from scipy.io import savemat

    from tests.test_select_parts import seam_body

    _, root = server
    subdiv, transform, n = seam_body(rows=46, cols=599, head_rows=6, hands=False, spacing=0.01)
    assert n == 27554
    savemat(root / "subdiv.mat", subdiv)
    savemat(root / "transform.mat", transform)
    return root


def _mesh_registry(monkeypatch, base: str) -> None:
    monkeypatch.setattr(assets, "ASSETS", [
        Asset("exact", base + "good.bin", "exact.bin", sha256=DIGEST),
        Asset("smpl_subdiv", base + "subdiv.mat", "SMPL_subdiv.mat"),
        Asset("smpl_subdiv_transform", base + "transform.mat", "SMPL_SUBDIV_TRANSFORM.mat"),
    ])


def test_fetch_builds_the_part_table_and_verify_checks_it(server, mesh_files, monkeypatch,
                                                          tmp_path, capsys):
    from transforms.s6_select import parts

    _mesh_registry(monkeypatch, server[0])
    model_dir = tmp_path / "models"
    assert exit_status(assets_cli.main, ["fetch", f"--model_dir={model_dir}"]) == 0
    out = capsys.readouterr().out
    assert [line.split("\t")[:2] for line in out.splitlines()] == [
        ["ok", "exact"], ["ok", "smpl_subdiv"], ["ok", "smpl_subdiv_transform"], ["ok", "part_table"]]
    assert parts.load_part_table(str(model_dir)).shape == (27554,)
    lock = assets.read_lock(str(model_dir))
    assert set(lock) == {"smpl_subdiv", "smpl_subdiv_transform", "part_table"}
    assert lock["part_table"] == hashlib.sha256((model_dir / "part_table.npy").read_bytes()).hexdigest()
    assert exit_status(assets_cli.main, ["verify", f"--model_dir={model_dir}"]) == 0
    capsys.readouterr()

    table = parts.load_part_table(str(model_dir))
    table[0] ^= 1  # a valid table, but not the one that was built: the lock catches it
    np.save(model_dir / "part_table.npy", table)
    assert exit_status(assets_cli.main, ["verify", f"--model_dir={model_dir}"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("BAD\tpart_table\t") and "lock" in errors[0]


def test_fetch_offline_names_every_missing_file_and_exits_2(server, monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a loopback port nobody listens on: "offline"
        probe.bind(("127.0.0.1", 0))
        offline = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    _mesh_registry(monkeypatch, offline)
    model_dir = tmp_path / "models"
    assert exit_status(assets_cli.main, ["fetch", f"--model_dir={model_dir}", "--timeout_s=2",
                            "--retries=0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert [line.split("\t")[:2] for line in errors] == [
        ["MISSING", "exact"], ["MISSING", "smpl_subdiv"], ["MISSING", "smpl_subdiv_transform"],
        ["MISSING", "part_table"]]
    assert f"put {offline}subdiv.mat there by hand" in errors[1]
    assert "SMPL_subdiv.mat" in errors[3] and "is missing" in errors[3]


def test_unknown_asset_name_is_a_usage_error(registry, capsys):
    assert exit_status(assets_cli.main, ["verify", "--names=nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown asset 'nope'")
