"""Long-lived shared services: the Arrow replay buffer and the FastAPI status app."""
