"""Read a rebuild's pipeline proto the way Dataflow sees it: environments, resource hints and the
edges between steps of different environments (which cannot fuse, so their data is materialised).

Used by tests/test_rebuild.py, tests/test_dataflow_template.py and bench/bench_boundary.py.
"""
from __future__ import annotations

from typing import Iterator, Sequence

ACCELERATOR_URN = "beam:resources:accelerator:v1"


def build_rebuild(argv: Sequence[str]):
    """(pipeline, job options, output PCollections by name) of a rebuild built, not run, for `argv`."""
    from beam_jobs import rebuild
    from beam_jobs.common import make_pipeline, split_job_flags

    job, pipeline_options = split_job_flags(rebuild.RebuildOptions, list(argv))
    pipeline = make_pipeline(pipeline_options)
    rebuild.build(pipeline, job)
    return pipeline, job


def build_rebuild_proto(argv: Sequence[str]):
    """The runner API proto of a rebuild built, not run, for `argv`."""
    pipeline, _ = build_rebuild(argv)
    return pipeline.to_runner_api()


def leaf_transforms(proto) -> Iterator[tuple[str, object]]:
    """(id, transform) of every primitive step."""
    for transform_id, transform in proto.components.transforms.items():
        if not transform.subtransforms:
            yield transform_id, transform


def accelerator_of(proto, transform) -> bytes:
    """The accelerator hint of a step's environment (b"" when none)."""
    environment = proto.components.environments.get(transform.environment_id)
    return dict(environment.resource_hints).get(ACCELERATOR_URN, b"") if environment else b""


def steps_by_hint(proto, accelerator: bytes) -> tuple[set[str], set[str]]:
    """(names of steps whose environment asks for `accelerator`, names of steps with no
    accelerator); asserts no step asks for any other accelerator. Runner-native steps with no
    environment (GroupByKey, Impulse) are in neither."""
    hinted, plain = set(), set()
    for _, transform in leaf_transforms(proto):
        if not transform.environment_id:
            continue
        hint = accelerator_of(proto, transform)
        assert hint in (b"", accelerator), (transform.unique_name, hint)
        (hinted if hint else plain).add(transform.unique_name)
    return hinted, plain


def _producers(proto) -> dict[str, tuple[object, str]]:
    """PCollection id -> (the step that produces it, its output tag)."""
    return {pcoll: (transform, tag) for _, transform in leaf_transforms(proto)
            for tag, pcoll in transform.outputs.items()}


def _sources(proto, producers, pcoll: str) -> Iterator[tuple[str, object, str]]:
    """(PCollection, producer, tag) of the steps that run in an environment and feed `pcoll`,
    looking through runner-native steps with no environment (Flatten, GroupByKey)."""
    transform, tag = producers[pcoll]
    if transform.environment_id:
        yield pcoll, transform, tag
        return
    for upstream in transform.inputs.values():
        yield from _sources(proto, producers, upstream)


def cross_environment_edges(proto) -> set[tuple[str, str, str, bool]]:
    """(producer step, output tag, consumer step, into_accelerator) for every PCollection made in
    one environment and consumed in another (an edge Dataflow must materialise)."""
    producers = _producers(proto)
    edges = set()
    for _, consumer in leaf_transforms(proto):
        if not consumer.environment_id:
            continue
        for pcoll in consumer.inputs.values():
            for _, producer, tag in _sources(proto, producers, pcoll):
                if accelerator_of(proto, producer) != accelerator_of(proto, consumer):
                    edges.add((producer.unique_name, tag, consumer.unique_name,
                               bool(accelerator_of(proto, consumer))))
    return edges


def upstream_step_names(proto, step_name: str) -> set[str]:
    """Names of every primitive step that `step_name` depends on, through main and side inputs."""
    producers = _producers(proto)
    by_name = {transform.unique_name: transform for _, transform in leaf_transforms(proto)}
    seen, todo = set(), list(by_name[step_name].inputs.values())
    while todo:
        transform, _ = producers[todo.pop()]
        if transform.unique_name not in seen:
            seen.add(transform.unique_name)
            todo.extend(transform.inputs.values())
    return seen
