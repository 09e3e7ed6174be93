"""How close a bake is to runtime steering (compare), and whether a persona persists (persist)."""
