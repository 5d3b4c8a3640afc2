"""Fixtures shared across test modules: the loopback HTTP server, the GCS emulator and the small
dataset built by the project's own writer."""
import pytest

pytest_plugins = ["tests.http_fixture", "tests.gcs_emulator", "tests.jobs_dataset"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The fast tier: every test not marked `pipeline` (runs a Beam pipeline, a job, a subprocess
    or an emulator), `model` (runs a real model) nor `slow` is a `unit` test (`make test-fast` =
    `pytest -m unit`)."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("pipeline", "model", "slow")):
            item.add_marker(pytest.mark.unit)


def exit_status(main, argv) -> int:
    """The exit status a job's `main(argv)` ends with (jobs end through `run_main`, which exits)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code
