"""Defences on what the edge sends (``defence``): clipping, calibrated noise, and their epsilon."""
