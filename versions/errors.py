"""Errors of the versioned store (store-level failures are :class:`versions.store.StoreError`)."""

from __future__ import annotations


class PublishError(RuntimeError):
    pass


class PublishConflict(PublishError):
    """Another publisher (or a rollback) moved CURRENT first; re-plan against the new CURRENT."""


class IntegrityError(PublishError):
    """An object's bytes do not match the size / sha256 its manifest records."""


class UnknownVersion(PublishError):
    pass


NOT_A_STORE_HINT = "(no CURRENT, no manifest); check --store (the prefix CURRENT lies under)"
"""What to say where a --store holds nothing published: most often a typo'd path or prefix, the
bucket's root or the store's parent folder."""
