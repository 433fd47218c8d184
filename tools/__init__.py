"""RegMix-D pipeline tools, each runnable as `python -m tools.<name> --help`."""
