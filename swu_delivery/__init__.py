"""swu-delivery: a gRPC service that delivers templated email through pluggable ESP adapters."""

__version__ = "0.1.0"
