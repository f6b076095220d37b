"""Pure-torch / numpy reference implementations that every fast path is checked against."""
