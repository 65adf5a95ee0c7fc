"""Errors the store raises.

Every message is one line that names the file or the row, so the CLI can print it as is and exit.
"""

from __future__ import annotations


class StoreError(Exception):
    """The database can't be used: not ours, corrupt, newer than this Workbench, or locked."""


class NotFoundError(StoreError, LookupError):
    """A session, message, build or benchmark run id that is not in the database.

    A LookupError too, so callers that think of ids as keys can catch it as one.
    """
