"""The conformance suite and fixtures third-party drivers reuse."""
