"""The one error type for mistakes in what the user gave, and how many of them are reported."""

from collections.abc import Iterable


class UserInputError(ValueError):
    """Bad user input. The message says what is wrong and where, and is shown to the user as is."""


SHOWN_PROBLEMS = 20  # an error lists this many problems, then counts the rest
QUOTED_CHARACTERS = 40  # of a value from a user's file that an error quotes: enough to find it


def quoted(value: object) -> str:
    """A value from a user's file as an error may quote it: short, so that the error names
    the problem without repeating what the file holds."""
    text = repr(value)
    return text if len(text) <= QUOTED_CHARACTERS else text[: QUOTED_CHARACTERS - 3] + "..."


class Problems:
    """Problems found while checking input: every one counted, the first few kept to show
    (a file of a million bad lines must not hold a million messages)."""

    def __init__(self, limit: int = SHOWN_PROBLEMS) -> None:
        self.shown: list[str] = []
        self.count = 0
        self.limit = limit

    def append(self, problem: str) -> None:
        self.count += 1
        if len(self.shown) < self.limit:
            self.shown.append(problem)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.shown)


def raise_all(
    problems: Problems | Iterable[str], heading: str, limit: int = SHOWN_PROBLEMS
) -> None:
    """Raise one UserInputError listing every problem found (the first `limit` of them)."""
    if not isinstance(problems, Problems):
        collected = Problems(limit)
        for problem in problems:
            collected.append(problem)
        problems = collected
    if not problems.count:
        return
    shown = problems.shown[:limit]
    more = problems.count - len(shown)
    lines = [heading, *(f"  - {p}" for p in shown)]
    if more:
        lines.append(f"  ... and {more} more")
    raise UserInputError("\n".join(lines))
