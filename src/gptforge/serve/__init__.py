"""An OpenAI-compatible HTTP server for a checkpoint (``gptforge serve``; docs/serving.md).

``protocol.py`` is the API's wire format (requests checked, responses and errors as JSON),
``completion.py`` runs one request on the model through the inference library, ``server.py`` is
the HTTP server (standard library only). Nothing here is imported by the rest of the package.
"""
