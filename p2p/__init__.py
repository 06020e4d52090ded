"""lamina p2p package."""
