"""One router per endpoint family (files, fine_tuning, models, completions, ops)."""
