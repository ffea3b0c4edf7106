"""byolkit serving (see its issue; arrives in a later change)."""
