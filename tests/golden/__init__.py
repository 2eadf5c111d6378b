"""Golden figures of the simulator (README.md here): the cases (cases.py) and their generator (make_golden.py)."""
