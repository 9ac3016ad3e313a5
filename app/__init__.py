"""The HTTP API (Falcon, WSGI). Resources are thin: parse, call the core, answer."""
