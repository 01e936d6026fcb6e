"""Prompt data: the CoProV2 prompt lists and the prompt-pair table the ``pairs/`` stage renders."""


class DataError(ValueError):
    """Prompt data is unreadable, malformed or selects nothing; the message says where and why."""
