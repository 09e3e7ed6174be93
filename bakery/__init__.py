"""bakery: bake activation-steering vectors into ordinary model checkpoints."""

__version__ = "0.1.0"
