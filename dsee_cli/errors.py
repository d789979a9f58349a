"""The one exception type the CLI turns into a clean one-paragraph error and a non-zero exit."""


class DSEEError(Exception):
    """A user-facing error: bad configuration, missing data or model, unreachable Hub.

    The message is a complete paragraph naming the bad value and the valid choices.
    """


def choice_error(what: str, value: object, choices: object) -> DSEEError:
    return DSEEError(f"Unknown {what} {value!r}. Valid choices: {', '.join(map(str, choices))}.")
