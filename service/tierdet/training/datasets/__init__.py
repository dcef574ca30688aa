"""Data sets tierdet makes itself (for training and measuring small models offline)."""
