"""Lottery Ticket Rewinding / IMP (SPEC §2). (being written)"""
from . import SearchContext, Ticket


def search(ctx: SearchContext) -> Ticket:
    raise NotImplementedError
