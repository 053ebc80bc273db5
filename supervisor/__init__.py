"""mlx-supervisor daemon: budgets, sampling, policy, jobs, control."""
