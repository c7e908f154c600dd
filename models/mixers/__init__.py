"""Token mixers, one file per family. Each offers forward(x, state) -> (y, state), step and init_state."""
