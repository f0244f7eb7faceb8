"""Persistence: the feedback database (schema, migrations), cards served, and the report."""
