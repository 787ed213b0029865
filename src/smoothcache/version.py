"""The package version, in a module of its own: the build reads it (pyproject's dynamic version),
and the modules that record it (profiles, the CLI) import it without importing the package."""

__version__ = "0.1.0"
