"""The uploader used by the agent, and the central customer store service."""
