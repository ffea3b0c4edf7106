"""byolkit app (see its issue; arrives in a later change)."""
