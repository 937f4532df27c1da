"""Background and cross-cutting services: metrics, logs, the upload worker pool, the hot-file cache."""
