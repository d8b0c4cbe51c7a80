"""Tools around a run: metrics files, the PNG timeline, the progress bar and log lines above it."""
