"""`python -m dpruner` (also what `torchrun -m dpruner` runs)."""

from dpruner.cli.app import main

if __name__ == "__main__":
    main()
