"""Where the bytes live: the local filesystem store (the Store seam later backends plug into)."""
