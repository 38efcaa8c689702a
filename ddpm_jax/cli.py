"""What every command line of the project shares."""

import warnings


def one_line_warnings() -> None:
    """Warnings print as one line, `warning: <message>`, without the source line Python shows under each: they
    are meant for the user at the terminal."""
    def format_warning(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"warning: {kind}{message}\n"

    warnings.formatwarning = format_warning
