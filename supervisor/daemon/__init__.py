"""The daemon: its poll loop, jobs carrying out the lifecycle's actions, OS effects, and what it records."""
