"""The routing pipeline: admit, parse, candidates, produce data, pick, claim, release."""
