"""The commands: generate, translate, convert, to_records, sweep."""
