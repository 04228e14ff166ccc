"""The `ftcluster` commands (the top layer): parse arguments, call one function, print one line per error."""
