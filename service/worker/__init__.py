"""The worker: its lifecycle (``lifecycle.py``) around one message's path (``pipeline.py``)."""
