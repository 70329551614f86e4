"""The design brief's scale, which every benchmark projects its figures to."""

EVENTS_PER_S = 1_000
"""The brief's average rate."""
PEAK_EVENTS_PER_S = 5_000
EVENTS_PER_DAY = EVENTS_PER_S * 86_400
"""86.4 million: the average rate all day."""
USERS = 1_000_000
