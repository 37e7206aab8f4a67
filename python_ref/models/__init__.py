"""One file per architecture; each registers itself in python_ref.registry."""
