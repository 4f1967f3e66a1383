"""The shared core: specs, settings, Redis keys and the job store, storage, the commit protocol,
the output layout and score histograms. Both sides import it; it imports neither."""
