"""What the user sees on the terminal: one line a message, one line an error."""
