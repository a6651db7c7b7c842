"""The built-in mini world: datasets drawn on first use and a small CLIP shaped like ViT-B/16 (mini_world)."""
