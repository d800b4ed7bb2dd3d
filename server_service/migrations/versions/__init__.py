"""One file per revision of the server's schema."""
