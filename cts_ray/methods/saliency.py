"""Pruning-at-initialisation saliency baselines (SPEC §2): SNIP, GraSP, SynFlow. (being written)"""
from . import SearchContext, Ticket


def snip(ctx: SearchContext) -> Ticket:
    raise NotImplementedError


def grasp(ctx: SearchContext) -> Ticket:
    raise NotImplementedError


def synflow(ctx: SearchContext) -> Ticket:
    raise NotImplementedError
