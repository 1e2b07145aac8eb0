"""Where VM descriptions come from: the data file, the data directory, admin writes."""
