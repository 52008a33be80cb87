"""pytest plugin: placeholder replaced by the conformance suite."""
