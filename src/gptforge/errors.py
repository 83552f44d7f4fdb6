"""The one exception type users see.

Anything caused by the user's input (a missing file, a malformed JSONL line, an unknown config key,
an incompatible checkpoint) is raised as :class:`GptforgeError` with a message that names the file,
line or key and says what to do. The CLI prints it as a single line and exits non-zero; any other
exception is a bug and keeps its traceback.
"""


class GptforgeError(Exception):
    """A problem with the user's input or environment, described in one actionable line."""
