"""lbproxy: a Layer 7 load balancer that gets, renews and swaps its own TLS certificates."""

__version__ = "0.1.0"
