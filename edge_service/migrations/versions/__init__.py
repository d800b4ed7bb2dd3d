"""One file per revision of the edge's schema."""
