"""Data sets: the embedded digits set now; dataset specs and loaders grow here."""
