"""A toy method added the way README's "Adding a method" says: this package, one registry line, one YAML."""
