"""lclusterd: a lite clustered job scheduler for Debian."""

__version__ = "0.1.0"
