"""Annotate through the annotation store (dataset/annotations.py): models run only on misses.

    DecodedImage ─► StoreLookup ─hit──────────────────────────────► AnnotatedPhoto / Rejected
                        │ miss                                         (as stored)
                        ▼
                    Annotate (the wrapped transform) ─► StoreAnnotated (flush per bundle) ─► AnnotatedPhoto
                                 └─ rejects ─ joined with the misses' sha256 ─► StoreRejects ─► Rejected

`AnnotateWithStore(annotate, store, versions)` emits what `annotate` would (the hits' arrays are
decoded losslessly, so select / crop / encode give the same bytes) and counts
`fdh/annotate.store_hit` / `fdh/annotate.store_miss`. New entries are written at the end of every
bundle (and every `FLUSH_EVERY` photos), so a killed run keeps what finished. The annotate-stage
rejects carry no sha256: they are joined with the misses' (photo_id, sha256) by a small
CoGroupByKey (about 100 bytes per miss), so they are stored when the stage ends.

When the wrapped annotate is one DoFn (`Annotate.single_dofn()`, the lite annotator), lookup,
model and store writes run in ONE step instead (`_LookupOrAnnotateFn`): the two-branch form
ends in a Flatten of hits and fresh photos, which Beam's local runner holds whole (it
materialises every multi-input Flatten), and an AnnotatedPhoto is megabytes.

`AnnotateWithStore(None, store, versions)` is the re-derive: no model at all; a photo with no
entry for its (photo_id, sha256, models) becomes Rejected(stage='annotate', reason='not_in_store').
Before fetch, its `precheck()` (`PrecheckStore`) sends on, unfetched, each photo whose sole stored
entry yields no sample whatever the downstream settings (an annotate reject, or no detection):

    YfccRecord ─► PrecheckStore ─► FetchImages ─► DecodeImages ─► AnnotateWithStore(None) ─► select
                  record, or StoredPhoto ─(passed through)─► stand-in (stored sha256 + size, no pixels)

Lookups use `dataset.annotations.StoreIndex` (sorted arrays, binary search by photo id).
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
from typing import Any, Iterator, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from dataset import annotations as store_format
from transforms.records import (METRICS_NAMESPACE, REJECTS_TAG, AnnotatedPhoto, DecodedImage, Detections, Rejected,
                                StoredPhoto, YfccRecord)
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput, stage_output

STAGE = "annotate"
MISS_TAG = "miss"
PENDING_TAG = "pending"
NOT_IN_STORE = "not_in_store"
FLUSH_EVERY = 64
NO_STORE = "none"
CACHE_BYTES = 256 << 20  # Arrow tables of part files a lookup DoFn keeps (each <= FLUSH_EVERY entries)


def annotate_versions(annotate: Any) -> dict[str, Any]:
    """The model versions that key an `s5_annotate.Annotate`'s entries: annotator, model asset
    checksums (lock file / registry) or the mediapipe version, and every setting that changes
    the detections. (Reads Annotate's settings; Annotate has no public accessor yet.)"""
    if annotate._annotator == "lite":
        return {"annotator": "lite", "mediapipe": importlib.metadata.version("mediapipe"),
                "thresholds": dataclasses.asdict(annotate._lite_thresholds)}
    settings = annotate._fdh_settings()
    return {"annotator": "fdh", "assets": _asset_checksums(settings.asset_names(), settings.model_dir),
            "no_embeddings": settings.no_embeddings, "min_box_area": settings.min_box_area,
            "person_score": settings.person_score, "model_options": settings.model_options,
            "random_weights": settings.random_weights, "detector": settings.detector}


def _asset_checksums(names: list[str], model_dir: Optional[str]) -> dict[str, str]:
    """{asset: sha256 from the model dir's lock file, else the registry's (prefix), else 'unverified'}."""
    from transforms import assets

    lock = assets.read_lock(model_dir or assets.default_cache_dir())
    checksums = {}
    for name in names:
        asset = assets.get_asset(name)
        checksums[name] = lock.get(name) or asset.sha256 or asset.sha256_prefix or "unverified"
    return checksums


def entry_of(annotated: AnnotatedPhoto) -> store_format.Entry:
    """The store entry of a freshly annotated photo."""
    photo = annotated.photo
    arrays = store_format.detections_to_arrays(
        {name: getattr(annotated, name) for name in store_format.DET_SETS})
    detections = sum(len(getattr(annotated, name)) for name in store_format.DET_SETS
                     if getattr(annotated, name) is not None)
    return store_format.Entry(
        photo_id=photo.record.photo_id, sha256=photo.sha256, user_nsid=photo.record.user_nsid,
        height=int(photo.image.shape[0]), width=int(photo.image.shape[1]), annotator=annotated.annotator,
        status=store_format.ANNOTATED, payload=store_format.pack_arrays(arrays), detections=detections)


def reject_entry(rejected: Rejected, sha256: str, annotator: str) -> store_format.Entry:
    """The store entry of an annotate-stage reject of the photo with that sha256."""
    return store_format.Entry(
        photo_id=int(rejected.photo_id), sha256=sha256, user_nsid=rejected.user_nsid or "", height=0,
        width=0, annotator=annotator, status=store_format.REJECTED, reason=rejected.reason,
        detail=rejected.detail, detections=0)


def annotated_from_entry(entry: store_format.Entry, photo: DecodedImage) -> AnnotatedPhoto:
    """The AnnotatedPhoto a stored entry describes, on the (re-)decoded photo."""
    fields = store_format.arrays_to_fields(store_format.unpack_arrays(entry.payload), entry.height, entry.width)
    det_sets = {name: Detections(**fields[name]) if name in fields else None for name in store_format.DET_SETS}
    return AnnotatedPhoto(photo=photo, annotator=entry.annotator, **det_sets)


class _StoreLookupFn(StageDoFn):
    """Hit: the stored AnnotatedPhoto or reject. Miss: the photo on MISS_TAG and its
    (photo_id, sha256) on PENDING_TAG; store-only: a `not_in_store` reject."""

    stage = STAGE

    def __init__(self, directory: str, store_only: bool):
        self._directory = directory
        self._store_only = store_only
        self._hit = Metrics.counter(METRICS_NAMESPACE, "annotate.store_hit")
        self._miss = Metrics.counter(METRICS_NAMESPACE, "annotate.store_miss")

    def setup(self) -> None:
        self._index = store_format.read_index(self._directory)
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._cached_bytes = 0

    def _table(self, path: str) -> Any:
        """A part file's Arrow table, from an LRU of at most CACHE_BYTES."""
        if path in self._tables:
            self._tables.move_to_end(path)
            return self._tables[path]
        table = self._tables[path] = store_format.read_table(path)
        self._cached_bytes += table.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._tables) > 1:
            self._cached_bytes -= self._tables.popitem(last=False)[1].nbytes
        return table

    def _entry(self, row: store_format.IndexRow) -> store_format.Entry:
        """The entry of an index row (its file read once, then only that row converted)."""
        entry = store_format.entry_at(self._table(row.part), row.row)
        if entry.key != (row.photo_id, row.sha256):
            raise ValueError(f"{row.part} changed while this run read it (row {row.row} is not "
                             f"photo {row.photo_id})")
        return entry

    def process_element(self, photo: DecodedImage) -> Iterator:
        record = photo.record
        key = (record.photo_id, photo.sha256)
        row = self._index.find(*key)
        if row is None:
            self._miss.inc()
            if self._store_only:
                yield reject(STAGE, NOT_IN_STORE, str(record.photo_id),
                             f"no stored annotation for sha256 {photo.sha256[:16]}", record.photo_id,
                             record.user_nsid)
                return
            yield beam.pvalue.TaggedOutput(PENDING_TAG, key)
            yield beam.pvalue.TaggedOutput(MISS_TAG, photo)
            return
        self._hit.inc()
        entry = self._entry(row)
        if entry.status == store_format.REJECTED:
            yield reject(STAGE, entry.reason, str(record.photo_id), entry.detail, record.photo_id,
                         record.user_nsid)
            return
        yield annotated_from_entry(entry, photo)


class _PrecheckFn(beam.DoFn):
    """YfccRecord -> the record (to fetch) or, when the store holds exactly one entry for its
    photo id and that entry yields no sample, a StoredPhoto (both on the main output, so that
    fetch and decode stay fused with no Flatten: a local runner materialises every Flatten)."""

    def __init__(self, directory: str):
        self._directory = directory
        self._trusted = Metrics.counter(METRICS_NAMESPACE, "annotate.store_not_fetched")

    def setup(self) -> None:
        self._index = store_format.read_index(self._directory)

    def process(self, record: YfccRecord) -> Iterator:
        rows = self._index.rows_of(record.photo_id)
        if len(rows) == 1 and rows[0].yields_no_sample:
            self._trusted.inc()
            yield StoredPhoto(record, rows[0].sha256, rows[0].height, rows[0].width)
            return
        yield record


class PrecheckStore(beam.PTransform):
    """YfccRecord -> YfccRecord (to fetch) or StoredPhoto: the re-derive's trust rule, before fetch.

    A photo whose store entry cannot yield a sample whatever the downstream settings (an
    annotate-stage reject, or no detection at all) is not fetched again when the store holds
    exactly one entry (one source sha256) for its photo id under these models: it goes on as a
    StoredPhoto, which fetch passes through and decode turns into a pixel-free stand-in
    (`s4_decode.stand_in`) that annotate (a store hit) and select reject exactly as they would
    the refetched photo; it counts as decoded in the funnel, so stats.json is the same too. Skipping it never changes
    a sample; only a photo deleted or replaced upstream since is counted as its stored reject
    instead of fetch.not_found / annotate.not_in_store. Opted-out photos never get here (the
    prefilter drops them). Every other record is fetched and its entry used only when the
    fetched file's sha256 is the stored one.
    """

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "TrustStored" >> beam.ParDo(_PrecheckFn(self._directory))


class _BufferedStoreFn(beam.DoFn):
    """Pass elements through; write their entries as one part file per bundle (and every
    FLUSH_EVERY entries), so a killed run keeps each finished bundle."""

    def __init__(self, directory: str, versions: Mapping[str, Any]):
        self._directory = directory
        self._versions = dict(versions)
        self._written = Metrics.counter(METRICS_NAMESPACE, "annotate.store_written")

    def setup(self) -> None:
        store_format.ensure_models_file(self._directory.rsplit("/", 1)[0], self._versions)

    def start_bundle(self) -> None:
        self._buffer: list[store_format.Entry] = []

    def _add(self, entry: store_format.Entry) -> None:
        self._buffer.append(entry)
        if len(self._buffer) >= FLUSH_EVERY:
            self.finish_bundle()

    def finish_bundle(self) -> None:
        store_format.write_part(self._directory, self._buffer)
        self._written.inc(len(self._buffer))
        self._buffer = []


class _StoreAnnotatedFn(_BufferedStoreFn):
    def process(self, annotated: AnnotatedPhoto) -> Iterator[AnnotatedPhoto]:
        self._add(entry_of(annotated))
        yield annotated


class _StoreRejectsFn(_BufferedStoreFn):
    """(photo_id, {"sha": [sha256], "rejects": [Rejected]}) -> the rejects, stored when the
    photo's sha256 is known for sure (one distinct value)."""

    def process(self, element: tuple[Any, Mapping[str, list]]) -> Iterator[Rejected]:
        _, grouped = element
        shas = set(grouped["sha"])
        for rejected in grouped["rejects"]:
            if len(shas) == 1 and rejected.stage == STAGE and rejected.photo_id is not None:
                self._add(reject_entry(rejected, next(iter(shas)), self._versions["annotator"]))
            yield rejected


class _LookupOrAnnotateFn(_StoreLookupFn):
    """Hit: the stored result. Miss: the wrapped annotate DoFn, in this same step, and its
    outputs stored (annotations, and annotate-stage rejects under their photo's sha256). One
    step means no Flatten of hits and fresh photos: the local runner holds a multi-input
    Flatten's inputs whole, and AnnotatedPhotos are megabytes each. A batching DoFn's outputs
    from finish_bundle (its last partial batch) are stored and passed on too."""

    def __init__(self, directory: str, versions: Mapping[str, Any], annotate_fn: beam.DoFn):
        super().__init__(directory, store_only=False)
        self._annotate_fn = annotate_fn
        self._store = _BufferedStoreFn(directory, versions)
        self._annotator = versions["annotator"]

    def setup(self) -> None:
        super().setup()
        self._store.setup()
        self._annotate_fn.setup()

    def start_bundle(self) -> None:
        self._store.start_bundle()
        self._annotate_fn.start_bundle()
        self._pending: dict[int, str] = {}  # photo id -> sha256 of the misses not answered yet

    def finish_bundle(self) -> Iterator:
        for windowed in self._annotate_fn.finish_bundle() or ():
            tag = getattr(windowed, "tag", None)
            value = windowed.value if tag is None else windowed.value.value
            self._keep(value if tag is None else beam.pvalue.TaggedOutput(tag, value))
            yield windowed
        self._store.finish_bundle()

    def teardown(self) -> None:
        self._annotate_fn.teardown()

    def process_element(self, photo: DecodedImage) -> Iterator:
        for output in super().process_element(photo):
            tag = getattr(output, "tag", None)
            if tag == MISS_TAG:
                self._pending[photo.record.photo_id] = photo.sha256
                for annotated in self._annotate_fn.process(photo):
                    self._keep(annotated)
                    yield annotated
            elif tag != PENDING_TAG:
                yield output

    def _keep(self, output: Any) -> None:
        """Store one output of the wrapped DoFn: an AnnotatedPhoto, or an annotate reject."""
        if getattr(output, "tag", None) == REJECTS_TAG:
            rejected = output.value
            sha256 = self._pending.pop(rejected.photo_id, None)
            if rejected.stage == STAGE and sha256 is not None:
                self._store._add(reject_entry(rejected, sha256, self._annotator))
        elif isinstance(output, AnnotatedPhoto):
            self._pending.pop(output.photo.record.photo_id, None)
            self._store._add(entry_of(output))


class AnnotateWithStore(beam.PTransform):
    """DecodedImage -> StageOutput(AnnotatedPhoto, Rejected), through the store at `store`.

    Args:
      annotate: the annotate PTransform to run on misses (e.g. `s5_annotate.Annotate`); None:
        re-derive from the store alone (misses become `annotate.not_in_store` rejects).
      store: the store root (local or gs://), e.g. `dataset.annotations.default_store(OUT)`.
      versions: the model versions (`annotate_versions(annotate)`); they pick the entries.
    """

    def __init__(self, annotate: Optional[beam.PTransform], store: str, versions: Mapping[str, Any]):
        super().__init__()
        self._annotate = annotate
        self._versions = dict(versions)
        self._directory = store_format.model_dir(store, store_format.model_key(self._versions))

    def precheck(self) -> PrecheckStore:
        """The re-derive's `PrecheckStore` over the same entries (to run before fetch)."""
        return PrecheckStore(self._directory)

    def expand(self, photos: beam.PCollection) -> StageOutput:
        annotate_fn = getattr(self._annotate, "single_dofn", lambda: None)()
        if annotate_fn is not None:  # one step, no Flatten (see _LookupOrAnnotateFn)
            return stage_output(photos | "StoreOrAnnotate" >> beam.ParDo(
                _LookupOrAnnotateFn(self._directory, self._versions, annotate_fn)).with_outputs(
                    REJECTS_TAG, main="main"))
        looked = photos | "StoreLookup" >> beam.ParDo(
            _StoreLookupFn(self._directory, self._annotate is None)).with_outputs(
                REJECTS_TAG, MISS_TAG, PENDING_TAG, main="main")
        if self._annotate is None:
            return StageOutput(main=looked.main, rejects=looked[REJECTS_TAG])
        fresh = looked[MISS_TAG] | "Annotate" >> self._annotate
        stored = fresh.main | "StoreAnnotated" >> beam.ParDo(_StoreAnnotatedFn(self._directory, self._versions))
        fresh_rejects = (
            {"sha": looked[PENDING_TAG],
             "rejects": fresh.rejects | "KeyRejects" >> beam.Map(lambda r: (r.photo_id, r))}
            | "JoinRejectSha" >> beam.CoGroupByKey()
            | "StoreRejects" >> beam.ParDo(_StoreRejectsFn(self._directory, self._versions)))
        return StageOutput(
            main=(looked.main, stored) | "AllAnnotated" >> beam.Flatten(),
            rejects=(looked[REJECTS_TAG], fresh_rejects) | "AllAnnotateRejects" >> beam.Flatten())


def check_store_has(store: str, versions: Mapping[str, Any]) -> None:
    """Raise ValueError (one line, listing what the store holds) unless it has entries of `versions`."""
    wanted = store_format.model_dir(store, store_format.model_key(versions))
    held = store_format.model_dirs(store)
    if wanted not in held:
        raise ValueError(f"--from_annotations={store} holds no annotations of these models "
                         f"({store_format.model_key(versions)}: {dict(versions)}); it holds: "
                         + (", ".join(d.rsplit('/', 1)[1] for d in held) or "nothing"))


def with_annotation_store(annotate: beam.PTransform, output: str, annotation_store: Optional[str] = None,
                          from_annotations: Optional[str] = None) -> beam.PTransform:
    """What `rebuild` runs in place of `annotate`: re-derive from `from_annotations` (no model);
    else the store at `annotation_store` (default OUTPUT/annotations; 'none': no store)."""
    versions = annotate_versions(annotate)
    if from_annotations:
        check_store_has(from_annotations, versions)
        return AnnotateWithStore(None, from_annotations, versions)
    if annotation_store == NO_STORE:
        return annotate
    return AnnotateWithStore(annotate, annotation_store or store_format.default_store(output), versions)
