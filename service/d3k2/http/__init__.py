"""The HTTP edge: the Flask app factory, blueprints, JWT auth, logs, metrics, OpenAPI."""
