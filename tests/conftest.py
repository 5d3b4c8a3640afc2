"""Fixtures shared across test modules: the loopback HTTP server, the GCS emulator and the small
dataset built by the project's own writer."""
pytest_plugins = ["tests.http_fixture", "tests.gcs_emulator", "tests.jobs_dataset"]
