"""The pure core: request models, the rule set and its loader, facts, drafts, the evaluator and cards.

Imports neither Flask nor requests nor the database (an import-linter contract in pyproject.toml)."""
