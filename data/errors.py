"""The one exception the data package raises for bad or inconsistent data.

Every `DataError` message names the file or config key at fault and says how to
fix it, so a user never has to read a traceback to learn what went wrong.
"""


class DataError(ValueError):
    """Bad or inconsistent data: a missing file, a corrupt shard, a tokenizer that does not match."""
