"""The VMA side: an HTTP client of the VMA's API (`client`) and a VMA simulator (`simulator`)."""
