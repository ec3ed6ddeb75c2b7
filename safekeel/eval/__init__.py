"""Evaluation: prompt sets asked through the guard, replies kept and judged, the safety gate, statistics."""
