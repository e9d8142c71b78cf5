"""Merging on a Ray cluster (the optional extra ``ray``): ``merge_many(..., executor=Ray(...))``
and the command line's ``--ray``. A client of ``api`` and ``events``; the core never imports it,
and Ray is imported only when a run asks for it."""

from .driver import Ray

__all__ = ["Ray"]
