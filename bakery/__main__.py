"""``python -m bakery``: the command line (also ``accelerate launch -m bakery bake ...``)."""

from bakery.cli import main

if __name__ == "__main__":
    main()
