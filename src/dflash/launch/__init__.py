"""Launching: what a job asks the scheduler for, what it runs inside its allocation, profiles."""
