"""What every layer stands on: the error base class, progress reporting, lineage. No I/O of its own
beyond asking git for the commit."""
