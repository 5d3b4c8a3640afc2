"""A GCS emulator on loopback that Beam's gs:// filesystem talks to, for end-to-end tests.

`gcs_emulator` (a module-scoped pytest fixture) starts gcp-storage-emulator in memory on
127.0.0.1 plus a loopback OAuth token server, and yields a `GcsEmulator`: `env` is the
environment to run a job in (`run_job`), `bucket` a google-cloud-storage bucket on the emulator,
and `upload_dir` / `download_prefix` / `names` copy files in and out.

Beam's GCS filesystem always looks up Google credentials (retrying for ~30 s when there are
none), so the environment holds a throwaway service-account key whose token URI is the loopback
token server; NO_GCE_CHECK stops google-auth from probing the metadata server. Beam's gcsio and
the Python storage client find the emulator through STORAGE_EMULATOR_HOST (every job, search_user
included, reads gs:// through Beam's FileSystems: `dataset.fs`). Jobs run in a subprocess because Beam caches its GCS client and credentials per process.

    def test_x(gcs_emulator): ...       # registered in tests/conftest.py
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
BUCKET = "fdh-test"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    """OAuth token endpoint on loopback: any POST gets a bearer token the emulator ignores."""

    def do_POST(self):  # noqa: N802 (http.server naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "emulator", "expires_in": 3600,
                           "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _service_account_key(path: Path, token_uri: str) -> None:
    """Write a throwaway service-account key (a fresh RSA key) whose tokens come from token_uri."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "fdh-test", "private_key_id": "1",
        "private_key": key, "client_email": "job@fdh-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": token_uri}))


@dataclass
class GcsEmulator:
    """A running emulator: the job environment and a storage client bucket on it."""

    env: dict[str, str]
    bucket: Any  # google.cloud.storage.Bucket on the emulator
    bucket_name: str = BUCKET

    def url(self, name: str) -> str:
        """gs://BUCKET/name."""
        return f"gs://{self.bucket_name}/{name.lstrip('/')}"

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str) -> list[str]:
        """Copy every file under local_dir to gs://BUCKET/prefix/..., same relative layout."""
        root = Path(local_dir)
        names = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}"
            self.bucket.blob(name).upload_from_filename(str(path))
            names.append(name)
        return names

    def upload_file(self, local_file: str | os.PathLike, name: str) -> str:
        self.bucket.blob(name).upload_from_filename(str(local_file))
        return self.url(name)

    def names(self, prefix: str) -> set[str]:
        """Object names under prefix (names relative to the bucket)."""
        return {blob.name for blob in self.bucket.list_blobs(prefix=prefix)}

    def read(self, name: str) -> bytes:
        return self.bucket.blob(name).download_as_bytes()

    def download_prefix(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Copy every object under prefix/ into local_dir, relative to prefix."""
        root = Path(local_dir)
        prefix = prefix.rstrip("/") + "/"
        for name in self.names(prefix):
            target = root / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(name))
        return root

    def run_job(self, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`python -m module args...` in a fresh process pointed at the emulator."""
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def start_emulator(workdir: Path, bucket: str = BUCKET) -> Iterator[GcsEmulator]:
    """Start the token server and the emulator; yields a GcsEmulator, stops both after."""
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    tokens = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    key_file = workdir / "service_account.json"
    _service_account_key(key_file, f"http://127.0.0.1:{tokens.server_port}/token")
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    host = f"http://127.0.0.1:{port}"
    env = dict(os.environ, STORAGE_EMULATOR_HOST=host,
               GOOGLE_APPLICATION_CREDENTIALS=str(key_file), GOOGLE_CLOUD_PROJECT="fdh-test",
               NO_GCE_CHECK="true", HOME=str(workdir))
    try:
        client = storage.Client(project="fdh-test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": host})
        yield GcsEmulator(env=env, bucket=client.bucket(bucket), bucket_name=bucket)
    finally:
        server.stop()
        tokens.shutdown()
        tokens.server_close()


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory) -> Iterator[GcsEmulator]:
    """One in-memory GCS emulator per test module (see the module docstring)."""
    yield from start_emulator(tmp_path_factory.mktemp("gcs"))

