"""Coordinate checks and width-transfer validation for schedule-free optimizers."""
