"""Plumbing every layer uses: user errors and exit codes, atomic file writes, the console and log file,
derived seeds, credential redaction, plots."""
