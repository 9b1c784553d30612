"""Backends, their state, and how one is picked."""
