"""Data: volume I/O, slicing, preparation, registration, channels and mappers."""
