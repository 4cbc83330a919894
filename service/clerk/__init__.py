"""Clerk: its API's calls, retries, the circuit breaker, the rate window."""
