"""The versioned store: the bucket's layout, object stores (local, S3), reading versions
(catalog), the one commit that moves CURRENT, and publish, rollback, forget, retention and
models built on it."""
