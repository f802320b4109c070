"""Counts as English, for every line a user reads (summaries, the report, the CLI). No imports."""


def count(n: int, noun: str, plural: str = "") -> str:
    """A count as English: 'one seed', '3 seeds', '5,000 seeds' (``plural`` where adding an s is wrong)."""
    return f"one {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"
