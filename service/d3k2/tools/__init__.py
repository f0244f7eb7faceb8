"""Command-line tools: serve, replay, explain / what-if, feedback report. Nothing imports them."""
