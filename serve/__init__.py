"""The medray Ray Serve application (see app.py) and its config (config.yaml)."""
