"""One module per serving engine; each check is a real run, rules only explain a failure."""
