"""Turning results into things people read: console tables, JSON, PNGs."""
