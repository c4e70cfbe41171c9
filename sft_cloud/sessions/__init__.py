"""The cloud's sessions: two-part and middle, their registry, validation, finished runs."""
