"""Where the bytes live: the local filesystem store, content-addressed blobs (dedup) and the
AES-GCM segment format (encryption at rest); the Store seam later backends plug into."""
