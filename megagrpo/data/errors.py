"""The one error class of bad data.

A ``DataError`` is the user's data (or its naming in the recipe), never a bug: the ``megagrpo``
command prints it as one ``megagrpo train: error: ...`` line, without a traceback. Its message
names the file (or dataset and split), the row or line and the column, and what was expected.
Rows count from 0 (as ``dataset[i]``), lines from 1 (as an editor shows them); every message
says which of the two it gives.
"""


class DataError(ValueError):
    """A dataset that cannot be used as asked; the message names where and what was expected."""
