PREFIX = "shared:"
