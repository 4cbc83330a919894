"""What other teams run: the client library and the bulk tool."""
