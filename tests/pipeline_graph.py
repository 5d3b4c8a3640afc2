"""Find PCollections in a built (not yet run) Beam pipeline by the full label of their producer."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.pipeline import PipelineVisitor


def outputs_of(pipeline: beam.Pipeline, labels: Iterable[str]) -> dict:
    """{full label: main output PCollection} of the transforms (composite or not) named."""
    wanted, found = set(labels), {}

    class Finder(PipelineVisitor):
        def enter_composite_transform(self, node):
            self.visit_transform(node)

        def visit_transform(self, node):
            if node.full_label in wanted:
                found[node.full_label] = node.outputs[None]

    pipeline.visit(Finder())
    return found
