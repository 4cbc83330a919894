"""Who may ask for what, and what is recorded of it."""
