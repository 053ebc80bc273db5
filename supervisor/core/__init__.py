"""The pure core: job states, sizes, the policy and the job lifecycle. No I/O, no clock reads, no MLX."""
