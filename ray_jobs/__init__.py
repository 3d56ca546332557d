"""Thin entrypoints: parse config, connect to Ray, call one library function, say where outputs went."""
