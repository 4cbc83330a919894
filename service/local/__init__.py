"""Stand-ins and generators for the tests, the demo and the docs."""
