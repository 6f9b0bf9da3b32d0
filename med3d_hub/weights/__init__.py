"""Pretrained weights: the manifest, Hub transport and cache, checkpoint mapping, model files and the one
loader behind create_model. Imports networks and data."""
