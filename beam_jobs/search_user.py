"""Find the samples of a Flickr user (or photo) in a built FDH dataset.

    python -m beam_jobs.search_user --dataset=OUT/metadata.json --user_nsid=12345678@N00
    python -m beam_jobs.search_user --dataset=OUT --user_nsid=12345678@N00          # Parquet: fast
    python -m beam_jobs.search_user --dataset='OUT/cc-by-2/*/out-*.parquet' --photo_id=5577445566

For each matching sample it prints `Image {key} includes your username`, the exact line FDH's
own search_user.py prints, in metadata.json order (sorted by key). A sample found by --photo_id
alone prints `Image {key} includes your photo {id}`. With a metadata.json it reads the whole
file like FDH's script; with a dataset directory, a Parquet file or a glob it scans only the key,
user and photo columns of the shard Parquet files with a pushed-down filter. Paths may be local
or gs://.

Exit codes: 0 at least one match; 1 no match (a message on stderr says so); 2 bad usage or
unreadable input. To remove the samples found, see `python -m beam_jobs.takedown --help`.

This is a plain command line, not a Beam pipeline: one scan of small columns needs no workers.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from beam_jobs.common import JobOptions, run_main, split_job_flags
from beam_jobs.nsid import check_nsids
from dataset.search import Match, match_line, search
from transforms.opt_out import OptOut

EXIT_FOUND = 0
EXIT_NO_MATCH = 1
EXIT_ERROR = 2


class SearchUserOptions(JobOptions):
    """Flags of search_user."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", required=True,
                            help="What to search: a metadata.json (read whole, like FDH's script), "
                                 "a dataset directory (its shard Parquet files), a Parquet file, "
                                 "or a glob of Parquet files; local or gs://.")
        parser.add_argument("--user_nsid", action="append", default=[],
                            help="Flickr user NSID to look for (e.g. 12345678@N00); repeat for several.")
        parser.add_argument("--photo_id", action="append", type=int, default=[],
                            help="Flickr photo id to look for; repeat for several.")


def describe(match: Match, query: OptOut) -> str:
    """The line printed for one match: FDH's line when the user matched."""
    if match.user_nsid in query.user_nsids:
        return match_line(match.key)
    return f"Image {match.key} includes your photo {match.photo_id}"


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Print every sample of --dataset with one of the given user NSIDs or photo ids; returns
    the exit code (EXIT_FOUND, EXIT_NO_MATCH or EXIT_ERROR)."""
    args, _ = split_job_flags(SearchUserOptions, argv, __doc__)
    if not args.user_nsid and not args.photo_id:
        print("error: give at least one --user_nsid or --photo_id", file=sys.stderr)
        return EXIT_ERROR
    query = OptOut(frozenset(check_nsids(args.user_nsid)), frozenset(args.photo_id))
    source = args.dataset
    try:
        matches = search(source, query)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot search {source}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    for match in matches:
        print(describe(match, query))
    if not matches:
        wanted = ", ".join([f"user_nsid {u}" for u in args.user_nsid] +
                           [f"photo id {p}" for p in args.photo_id])
        print(f"No image in {source} matches {wanted}.", file=sys.stderr)
        return EXIT_NO_MATCH
    return EXIT_FOUND


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv, exit_code=lambda status: status)


if __name__ == "__main__":
    main()
