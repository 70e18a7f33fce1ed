"""Pure measuring functions over a loaded model and prompts: no file I/O here."""
