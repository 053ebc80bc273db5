"""Benchmarks of mlx-supervisor: ``python -m bench`` (full, ~6-8 min on 2 cores) or ``--quick`` (~1 min).

Everything that is compared is measured in the same invocation, interleaved where it is an A/B, and reported
as a ratio, so the numbers hold on whatever machine runs them. Results go to ``.bench/results.json``
(written atomically) with per-section details, and a table of metric, value, target and pass/miss is printed.

Sections (each module's docstring has the method):

- ``overhead``   steps/s supervised ÷ unsupervised in lockstep (``lockstep``: both arms alive, taking turns in
                 0.25 s slices under SIGSTOP/SIGCONT, with a 95 % bootstrap interval); then a few whole-run
                 interleaved A/B pairs via ``--stats-file``, as measured before; plus the in-process cost of
                 ``Session.end_step`` (``sdk_cost``) as the overhead's explanation.
- ``reaction``   a peak that jumps over budget: first over-budget sample → decision → worker exit; overshoot.
- ``goodput``    the leak scenario (50 MiB/step, 2 GiB, 1000 steps, small model) unsupervised with a hard
                 stop, and supervised with policy stop / shrink-only / adaptive; recovery phases per restart.
- ``checkpoint`` save/load of ~100 MB through ``worker.checkpoint`` ÷ raw ``dd`` of the same size.
- ``control``    daemon idle CPU and RSS, control request p99 (when the control plane is importable),
                 telemetry ingest rate from a synthetic flooding worker.

Notes on what the numbers mean:

- The machine may be shared: wall-clock ratios of runs a few seconds apart carry a few percent of noise
  from other processes (the load average at the end is recorded in ``meta``); on a shared 2-core VM one
  whole-run pair's ratio spreads 0.84-1.16. The overhead is therefore measured in lockstep, where both arms
  see the same machine within a quarter of a second, and reported with its interval; ``sdk_cost`` gives a
  noise-free lower-level view.
- goodput = (useful step time ÷ wall time) × (steps reached ÷ target): useful time is the sum of
  step_seconds of the distinct steps reached (a step redone after a restart counts once).
- recovery = decision → first step record of the next worker life, split into checkpoint, exit, spawn,
  start and first step; the summary's own ``recovery_seconds_*`` fields are kept in the details for
  comparison (they stop at the next step message, which may come from the old life).
"""
