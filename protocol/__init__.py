"""The torch-free core shared by producers and workers: job schema, codec, registry declaration, errors, keys."""
