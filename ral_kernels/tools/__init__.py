"""Developer tools apart from the op: compile checks for real GPU targets, time and memory
measurement, the demo, and the work counter."""
