"""Model implementations written for paged attention, and how to find and load them."""
