"""The errors edgeft raises for problems a user can fix.

Library code raises these; only the CLI turns them into a one-line message and an exit code.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug)."""


class DataError(EdgeftError):
    """A dataset file or row is unusable (the message names file:line)."""


class ModelError(EdgeftError):
    """A model, tokenizer or adapter cannot be loaded or does not fit its partner."""


class ParityError(EdgeftError):
    """A stage's output does not reproduce its input within the documented tolerance."""


class OutputExistsError(EdgeftError):
    """The output path already exists and --force was not given."""
