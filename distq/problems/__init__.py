"""The problem a run solves: its data (built-in sets, user files, standardisation) and its terminal rewards h
(built-in, user functions, lists of them)."""
