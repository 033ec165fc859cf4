"""Checkpoint I/O: the released Sa2VA directory format and checked state-dict loading."""
