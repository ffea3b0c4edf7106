"""byolkit export (see its issue; arrives in a later change)."""
