"""Search-space presets (YAML) that specs include with ``search: {preset: <name>}``."""
