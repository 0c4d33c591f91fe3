"""Data files: the remote model list (`files.txt`) and the MDX bags (`*.yaml`)."""
