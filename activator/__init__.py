"""Data plane: HTTP and CloudEvents front door (activator issue)."""
