"""A run becomes files, a model card, a Hub repo and a manifest entry; runs are compared. Imports training and below."""
