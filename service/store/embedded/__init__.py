"""The embedded store: one host, no server. Its pieces live beside each other
here: the shared tables (store.py), the journal (journal.py), recovery at
start (recovery.py) and the health board (health_board.py)."""
