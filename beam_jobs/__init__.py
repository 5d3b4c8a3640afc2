"""Beam jobs of fdh-beam: rebuild, scan, search_user, takedown, stats, verify (python -m beam_jobs.NAME)."""
import sys
import warnings

from beam_jobs import cli

# google-api-core warns at import about Python versions it will drop in 2027: noise for our users.
warnings.filterwarnings("ignore", message="You are using a Python version", category=FutureWarning)

# Started as `python -m beam_jobs.NAME`: quiet third-party logs before Beam is imported (its
# import logs "crcmod package not found"); `--verbose` keeps them. Library imports are untouched.
if cli.launched_as_job():
    cli.configure_logging(verbose=cli.VERBOSE_FLAG in sys.argv[1:])
