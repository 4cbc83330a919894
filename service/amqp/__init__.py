"""The broker: topology, consuming, publishing with confirms, the properties a message carries."""
