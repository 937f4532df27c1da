"""Pure policy decisions (no sockets, no files): which paths are acceptable."""
