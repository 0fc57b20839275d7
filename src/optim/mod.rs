//! Parameter groups, AdamW with explicit state, schedules, gradient clipping, EMA.
