"""Everything that touches transformers internals lives in this package.

Tested against the transformers range pinned in pyproject.toml.
"""
