"""Research studies built on training: the scaling ladder, ladders across seeds, growth
against dense training, and their reports."""
