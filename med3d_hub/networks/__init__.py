"""Network definitions and model names: no files, no Hub. Imports nothing of ours but med3d_hub.files."""
