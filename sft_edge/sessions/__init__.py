"""The edge's sessions: two-part, U-shaped, local, and the client protocol they share."""
