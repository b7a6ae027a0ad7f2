"""The one exception editors raise for bad settings or inputs; its message is one line."""


class EditorError(ValueError):
    pass
