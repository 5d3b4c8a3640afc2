"""Fixtures shared across test modules: the loopback HTTP server, the GCS emulator and the small
dataset built by the project's own writer."""
import inspect

import pytest

pytest_plugins = ["tests.http_fixture", "tests.gcs_emulator", "tests.jobs_dataset"]


# What marks a test as a `pipeline` test when it is not marked: fixtures that build a dataset or
# start a server process, and calls in its body that run a Beam pipeline, a job or a subprocess.
PIPELINE_FIXTURES = frozenset({"dataset", "built", "rebuilt", "world", "gcs_emulator", "demo_world"})
PIPELINE_CALLS = ("make_pipeline", "TestPipeline", "beam.Create", "write_with_beam", "subprocess",
                  ".run([", ".run(argv", "main([", "run_main(", "build_dataset(", "_run(", "run_job(")


def _runs_a_pipeline(item: pytest.Item) -> bool:
    if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return False
    return any(call in source for call in PIPELINE_CALLS)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The fast tier: a test marked `pipeline` (runs a Beam pipeline, a job, a subprocess or an
    emulator), `model` (runs a real model) or `slow` is not `unit`; an unmarked test is `pipeline`
    when its fixtures or body show it runs one (PIPELINE_FIXTURES, PIPELINE_CALLS), else `unit`
    (`make test-fast` = `pytest -m unit`)."""
    for item in items:
        if any(item.get_closest_marker(name) for name in ("pipeline", "model", "slow")):
            continue
        item.add_marker(pytest.mark.pipeline if _runs_a_pipeline(item) else pytest.mark.unit)


def exit_status(main, argv) -> int:
    """The exit status a job's `main(argv)` ends with (jobs end through `run_main`, which exits)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code
