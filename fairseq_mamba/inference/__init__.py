"""Running trained encoders: exact streaming, long-form encoding, and scoring the enhancement model."""
