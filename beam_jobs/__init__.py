"""Beam jobs of fdh-beam: rebuild, scan, search_user, takedown, stats, verify (python -m beam_jobs.NAME)."""
