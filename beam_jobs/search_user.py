"""Find the samples of a Flickr user (or photo) in a built FDH dataset.

    python -m beam_jobs.search_user OUT/metadata.json --user_nsid=12345678@N00
    python -m beam_jobs.search_user OUT --user_nsid=12345678@N00          # Parquet: fast
    python -m beam_jobs.search_user 'OUT/cc-by-2/*/out-*.parquet' --photo_id=5577445566

For each matching sample it prints `Image {key} includes your username`, the exact line FDH's
own search_user.py prints, in metadata.json order (sorted by key). A sample found by --photo_id
alone prints `Image {key} includes your photo {id}`. With a metadata.json it reads the whole
file like FDH's script; with a dataset directory, a Parquet file or a glob it scans only the key,
user and photo columns of the shard Parquet files with a pushed-down filter (about 1 s for
1.87M rows). Paths may be local or gs://.

Exit codes: 0 at least one match; 1 no match (a message on stderr says so); 2 bad usage or
unreadable input. To remove the samples found, see `python -m beam_jobs.takedown --help`.

This is a plain command line, not a Beam pipeline: one scan of small columns needs no workers.
"""
from __future__ import annotations

import sys

import click

from transforms.dataset_ops import Match, match_line, search
from transforms.opt_out import OptOut

EXIT_FOUND = 0
EXIT_NO_MATCH = 1
EXIT_ERROR = 2


def describe(match: Match, query: OptOut) -> str:
    """The line printed for one match: FDH's line when the user matched."""
    if match.user_nsid in query.user_nsids:
        return match_line(match.key)
    return f"Image {match.key} includes your photo {match.photo_id}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--user_nsid", multiple=True,
              help="Flickr user NSID to look for (e.g. 12345678@N00); repeat for several.")
@click.option("--photo_id", multiple=True, type=int,
              help="Flickr photo id to look for; repeat for several.")
def main(source: str, user_nsid: tuple[str, ...], photo_id: tuple[int, ...]) -> None:
    """Print every sample of SOURCE that has one of the given user NSIDs or photo ids.

    SOURCE is a metadata.json (read whole, like FDH's script), a dataset directory (its shard
    Parquet files), a Parquet file, or a glob of Parquet files; local or gs://.
    """
    if not user_nsid and not photo_id:
        raise click.UsageError("give at least one --user_nsid or --photo_id")
    query = OptOut(frozenset(user_nsid), frozenset(photo_id))
    try:
        matches = search(source, query)
    except (OSError, ValueError, KeyError) as error:
        click.echo(f"error: cannot search {source}: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_ERROR)
    for match in matches:
        click.echo(describe(match, query))
    if not matches:
        wanted = ", ".join([f"user_nsid {u}" for u in user_nsid] + [f"photo id {p}" for p in photo_id])
        click.echo(f"No image in {source} matches {wanted}.", err=True)
        sys.exit(EXIT_NO_MATCH)
    sys.exit(EXIT_FOUND)


if __name__ == "__main__":
    main()
