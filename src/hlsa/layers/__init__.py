"""Token mixers (one per file) and the small modules they share."""
