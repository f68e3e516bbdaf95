"""probe-server: crowdsourced Internet measurement over IPv4 and IPv6."""

__version__ = "0.1.0"
