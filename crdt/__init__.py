"""lamina crdt package."""
