"""Trust between the halves: development certificates, PEM files, bearer tokens."""
