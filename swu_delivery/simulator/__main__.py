"""``python -m swu_delivery.simulator``: run the ESP simulator from the command line."""

from swu_delivery.simulator import main

if __name__ == "__main__":
    raise SystemExit(main())
