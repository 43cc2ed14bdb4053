"""`python -m fedstack ...` is the `fedstack` command."""

from fedstack.cli import main

if __name__ == "__main__":
    main()
