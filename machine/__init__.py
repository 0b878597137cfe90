"""pymachine: create container hosts and expose their engine over mutual TLS."""

__version__ = "0.1.0"
