"""Strong-ticket methods (SPEC §2): relaxed Bernoulli gates and edge-popup. (being written)"""
from . import SearchContext, Ticket


def gates(ctx: SearchContext) -> Ticket:
    raise NotImplementedError


def edge_popup(ctx: SearchContext) -> Ticket:
    raise NotImplementedError
