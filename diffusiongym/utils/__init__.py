"""Small shared helpers: argument validation and two-sample statistics."""
