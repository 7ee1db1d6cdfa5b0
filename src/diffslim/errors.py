"""The error a person caused: caught at the CLI boundary and shown as one line, exit code 2."""


class UserError(ValueError):
    """A mistake in what the user gave (a path, a recipe, an option); the message says what to do."""
