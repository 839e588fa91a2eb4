"""Checks every split and size limit before the first update: one error naming the file, the line and the fix."""
