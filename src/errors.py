"""The one error type for mistakes in what the user gave."""


class UserInputError(ValueError):
    """Bad user input. The message says what is wrong and where, and is shown to the user as is."""


def raise_all(problems: list[str], heading: str, limit: int = 20) -> None:
    """Raise one UserInputError listing every problem found (the first `limit` of them)."""
    if not problems:
        return
    shown = problems[:limit]
    more = len(problems) - len(shown)
    lines = [heading, *(f"  - {p}" for p in shown)]
    if more:
        lines.append(f"  ... and {more} more")
    raise UserInputError("\n".join(lines))
