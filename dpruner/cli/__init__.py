"""The `dpruner` command line: parses arguments, calls the library, renders with Rich. No tensor code here."""
