"""Runtime steering and ablation hooks (the reference every bake is measured against), and
generation under them."""
