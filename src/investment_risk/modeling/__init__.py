"""Models: presets and offline resolution, networks, tokens and prompts, loading, and the one inference path."""
