"""lamina node package."""
