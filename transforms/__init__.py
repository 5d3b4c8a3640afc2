"""PTransforms and DoFns of the rebuild pipeline, one module per stage, in data-flow order:

s1_read -> s2_prefilter -> s3_fetch -> s4_decode -> s5_annotate -> s6_select -> s7_crop -> s8_write

`records` holds the typed records that flow between them, `rejects` the reject side output.
Each stage keeps a pure-Python core (testable without running Beam) beside its PTransform.
"""
