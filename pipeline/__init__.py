"""lamina pipeline package."""
