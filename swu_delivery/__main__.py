"""`python -m swu_delivery`: the same as the `swu-delivery` command."""

from swu_delivery.cli import main

if __name__ == "__main__":
    main()
