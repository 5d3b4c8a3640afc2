"""Beam jobs of fdh-beam: rebuild, scan, search_user, takedown, stats, verify (python -m beam_jobs.NAME)."""
import warnings

# google-api-core warns at import about Python versions it will drop in 2027: noise for our users.
warnings.filterwarnings("ignore", message="You are using a Python version", category=FutureWarning)
