"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching (engine.py), limits
and an output filter (limits.py), the routes (app.py) and a playground page (static/)."""
