"""`python -m shaq.bench`: see `shaq.bench` for what it measures and its options."""

from shaq.bench import main

if __name__ == "__main__":
    main()
